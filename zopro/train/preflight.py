"""What a run's settings ask of this machine, checked before its run directory is created or written.

``validate`` (:mod:`zopro.train.config`) checks a config on its own; this module checks it against the machine and
the inputs: the prompts load (every bad row of a ``--dataset`` file named), the thread count is one the machine can
start, and no size implies an allocation larger than the device's whole memory. Each memory figure is a *lower
bound* of one allocation the run cannot avoid (never an estimate of its peak), so a run that fits is never refused,
and one that cannot fit is refused in one line with the size and the limit instead of dying in the allocator (or
being killed by the kernel) after the run directory was written.
"""

from __future__ import annotations

import math
import os

import torch

from zopro.train.config import TrainConfig

# torch's intra-op pool gains nothing past one thread per logical CPU; a few per CPU still start (an oversubscription
# experiment), but --threads 100000 made libgomp abort the process and 1e29 overflowed torch.set_num_threads
THREADS_PER_CPU = 4
LORA_BYTES = 4  # the adapters are kept in float32 whatever the base's dtype (models.PolicyRewardModel)


def check(cfg: TrainConfig, device: torch.device) -> None:
    """Every machine-dependent check of ``cfg`` on ``device``; ValueError naming the setting otherwise."""
    check_threads(cfg.threads)
    n_train, n_eval = prompt_counts(cfg)
    check_memory(cfg, device, n_train, n_eval)


def check_threads(threads: int, what: str = "--threads") -> None:
    cpus = os.cpu_count() or 1
    limit = THREADS_PER_CPU * cpus
    if threads > limit:
        raise ValueError(f"{what} {threads}: more than {limit} ({THREADS_PER_CPU} per CPU; this machine has {cpus}): "
                         "torch gains nothing past one thread per core, and thousands abort the process")


def prompt_counts(cfg: TrainConfig) -> tuple[int, int]:
    """``(training prompts, held-out prompts)`` of ``cfg``'s dataset, loaded as the run loads them; a file that is no
    UTF-8 text is named (Python's own message names only the byte)."""
    from zopro.train.loading import load_prompts

    try:
        train, held_out = load_prompts(cfg)
    except UnicodeDecodeError as err:
        source = cfg.dataset_path or cfg.dataset
        raise ValueError(f"--dataset {source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return len(train), len(held_out)


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has in all (a GPU's total, or the host's physical memory)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: TrainConfig, device: torch.device, n_train: int, n_eval: int) -> None:
    """Refuse a size whose unavoidable allocation exceeds ``device``'s memory (see the module docstring)."""
    shape = model_shape(cfg)
    if shape is None:  # a base whose config cannot be read here: its load fails, still before anything is written
        return
    linear_sum, vocab = shape
    total = device_memory(device)
    adapters = 1 + (not cfg.reward_model) + (cfg.algorithm == "ppo")  # policy, reward, PPO's value adapter
    need = cfg.lora_r * linear_sum * LORA_BYTES * adapters
    _refuse_over(need, total, device, f"--lora-r {cfg.lora_r}: the {adapters} LoRA adapters alone need")
    row = vocab * torch.finfo(getattr(torch, cfg.dtype)).bits // 8  # one row's logits of its first sampled token
    # a rollout's prompts are cut into --data-shards shards, each generated on its own (in one process, or one or
    # more per rank): one shard's rows are generated at once
    rows = math.ceil(min(cfg.prompts_per_step, n_train) / max(1, cfg.data_shards)) * cfg.k
    _refuse_over(rows * row, total, device, f"--k {cfg.k}: a rollout of {rows} rows (x {vocab} logits) needs")
    if n_eval:
        rows = min(max(1, cfg.eval_batch // cfg.eval_samples), n_eval) * cfg.eval_samples
        _refuse_over(rows * row, total, device, f"--eval-samples {cfg.eval_samples}: an evaluation call of {rows} "
                                                f"rows (x {vocab} logits) needs")


def _refuse_over(need: int, total: int, device: torch.device, what: str) -> None:
    if need > total:
        raise ValueError(f"{what} at least {_size(need)}, more than the {_size(total)} of memory of {device.type}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def model_shape(cfg: TrainConfig) -> tuple[int, int] | None:
    """``(sum of in + out features over the linear layers LoRA adapts, vocabulary size)`` of ``cfg``'s base, from
    its config alone (the model built on the meta device: no weight is read or allocated); None when the config
    cannot be read here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zopro.train.loading import build_tiny_model, build_tiny_tokenizer, find_smollm2_gguf

    try:
        with torch.device("meta"):
            if cfg.model == "tiny":
                model = build_tiny_model(len(build_tiny_tokenizer()), seed=0)
            else:
                name, gguf = cfg.model, cfg.gguf_file or None
                if cfg.model == "smollm2":
                    path = find_smollm2_gguf()
                    name, gguf = str(path.parent), path.name
                offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
                config = AutoConfig.from_pretrained(name, local_files_only=offline,
                                                    **({"gguf_file": gguf} if gguf else {}))
                model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 (whatever fails here fails again, with its message, when the run loads the base)
        return None
    head = model.get_output_embeddings()
    linear_sum = sum(m.in_features + m.out_features for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m is not head)  # PEFT's "all-linear": all but the head
    return linear_sum, model.config.get_text_config().vocab_size
