"""From a :class:`~zopro.train.config.TrainConfig` to the objects a run needs: the device, the prompts (train and
held-out), the models (the shared-base bundle and its tokenizer) and the judge; and the smoke preset's tiny base,
saved beside a finished run."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from zopro.seeds import RunSeeds
from zopro.train import checkpoint, data, judges, models
from zopro.train.config import TrainConfig


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(cfg.device)


def load_prompts(cfg: TrainConfig):
    """(train records, eval records) for the configured dataset."""
    if cfg.dataset == "default":
        records = data.load_default_prompts()
    elif cfg.dataset == "hh-rlhf":
        records = data.load_hh_rlhf("train", cfg.dataset_path or None)
    elif cfg.dataset == "tldr":
        records = data.load_tldr("train", cfg.dataset_path or None)
    elif cfg.dataset == "wmt20":
        records = data.load_wmt20("train", cfg.dataset_path or None)
    else:
        records = data.load_local(cfg.dataset)
    if len(records) <= cfg.n_eval_prompts:
        raise ValueError(f"--dataset has {len(records)} records, not more than --n-eval-prompts {cfg.n_eval_prompts}")
    train, held_out = data.split_prompts(records, cfg.n_eval_prompts, RunSeeds.of(cfg).split)
    if cfg.max_prompts:
        train = train[:cfg.max_prompts]
    return train, held_out


def load_models(cfg: TrainConfig, device: torch.device):
    """(PolicyRewardModel bundle, tokenizer); the base is held once and shared by policy, reference and reward."""
    seeds = RunSeeds.of(cfg)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model == "tiny":
        tokenizer = models.build_tiny_tokenizer()
        base = models.build_tiny_model(len(tokenizer), seed=seeds.tiny_base).to(device)
    else:
        quant = None
        if cfg.quantize != "none":
            from transformers import BitsAndBytesConfig

            quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
                     if cfg.quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        if cfg.model == "smollm2":
            gguf = models.find_smollm2_gguf()
            base, tokenizer = models.load_base(str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
                                               quantization_config=quant, device=device)
        else:
            base, tokenizer = models.load_base(cfg.model, gguf_file=cfg.gguf_file or None, dtype=dtype,
                                               quantization_config=quant, device=device)
    reward = models.AnyRewardModel.from_pretrained(cfg.reward_model, device=device) if cfg.reward_model else None
    bundle = models.PolicyRewardModel(base, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, reward_model=reward,
                                      seed=seeds.adapters)
    return bundle, tokenizer


def load_judge(cfg: TrainConfig, device: torch.device):
    if cfg.judge == "heuristic":
        return judges.HeuristicJudge()
    kind, _, name = cfg.judge.partition(":")
    if kind == "llm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name).to(device)
        return judges.LLMJudge(model, AutoTokenizer.from_pretrained(name))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1).to(device)
    return judges.RewardModelJudge(model, AutoTokenizer.from_pretrained(name), device=device)

def save_tiny_base(tokenizer, seed: int, folder: Path) -> Path:
    """The smoke preset's base (the random tiny Llama of ``seed``, rebuilt: the run never changes it) and its
    tokenizer in ``save_pretrained`` format at ``folder``, published atomically; returns ``folder``."""
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for one 0.1 MB shard, after the run's own bar
    try:
        models.build_tiny_model(len(tokenizer), seed=seed).save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    checkpoint.atomic_publish_dir(tmp, folder)
    return folder
