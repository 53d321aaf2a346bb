"""Memory of one ZO step on the quantised base itself (``--zo-target codes``) against ZO on LoRA adapters over a
float base (issue 16): resident weight bytes and the peak of the step.

Arms (one fresh subprocess each, so that one arm's freed memory cannot hide another's peak):

* ``fp32+lora`` / ``bf16+lora``: a float base, LoRA (r 8, every linear layer of the decoder) moved by ZO;
* ``int8-codes`` / ``nf4-codes``: the decoder's linear layers quantised by bitsandbytes, no adapters; ZO moves the
  codes through :class:`zopro.quantised.CodeSpace` (int8: code-space probes; NF4: probes in the dequantised forward,
  stochastically rounded updates).

The model is a randomly initialised Llama of a named shape (``smollm2-135m``; ``llama-3.2-1b`` for a GPU); the
embeddings, norms and the (tied) head of the quantised arms stay float (``--quant-float``, float32 by default;
bitsandbytes leaves them in the load dtype). One step: ``ZOOptimizer.step`` (isotropic, two-sided) on a batch of
``--batch`` sequences of ``--seq`` tokens.

Reported per arm: ``weight_bytes`` (every parameter and buffer of the model, plus the quantised storage: codes,
scales, nested state), ``rss_model`` (the process's resident set after building the model, minus the resident set
before: on the CPU this includes what the allocator and bitsandbytes keep) and ``peak_step`` (CPU: the resident-set
high-water mark during the step minus the resident set before it; CUDA: ``max_memory_allocated`` during the step,
absolute); ``peak_total`` the high-water mark of the step above the resident set before the model was built (CPU)
or ``max_memory_allocated`` (CUDA): weights and the step's temporaries together. Results go to
``benchmarks/results/quant_zo_memory-<device>.{json,md}``.

    python -m benchmarks.quant_zo_memory [--shape smollm2-135m] [--arms ...] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
ARMS = ("fp32+lora", "bf16+lora", "int8-codes", "nf4-codes")
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------------
# One arm, in this process
def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _quantise_linears(model, kind: str, device):
    """Every ``nn.Linear`` of the decoder layers replaced by a bitsandbytes layer holding its weights (quantised when
    moved to ``device``)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                if kind == "nf4":
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, module=q)
                else:
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                            has_fp16_weights=False)
                    q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q.to(device))
                del lin
    return model


def _weight_bytes(model, space=None) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    if space is not None:  # quantised state held outside parameters (absmax, nested absmax; int8 SCB in module state)
        for w in space.weights.values():
            extra = [w.scb] if hasattr(w, "scb") else [w.absmax] + ([w.nested_absmax] if w.nested else [])
            total += sum(e.numel() * e.element_size() for e in extra if e.data_ptr() not in seen)
    return total


def measure_arm(arm: str, shape: str, device: str = "cpu", batch: int = 4, seq: int = 64,
                quant_float: str = "float32") -> dict:
    """Build arm ``arm`` at ``shape`` on ``device``, run one ZO step; returns its figures (see the module doc)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zopro import Isotropic, ZOOptimizer
    from zopro.train import memory

    dev = torch.device(device)
    torch.manual_seed(0)  # a benchmark process of its own: the global generator is ours
    memory.reset_peak(dev)
    rss0 = _rss()
    float_dtype = torch.bfloat16 if arm.startswith("bf16") else torch.float32
    if arm.endswith("codes"):  # the float parts of a quantised model (embeddings, norms, tied head)
        float_dtype = getattr(torch, quant_float)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 128))
    model = LlamaForCausalLM(cfg).to(float_dtype)
    model.requires_grad_(False)
    space = None
    if arm.endswith("codes"):
        from zopro.quantised import CodeSpace

        model = _quantise_linears(model, arm.split("-")[0], dev)
        model.to(dev)
        space = CodeSpace.from_model(model)
        params, sampler = space.parameters(), space.sampler(Isotropic())
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model.to(dev), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        sampler = Isotropic()
    model.eval()
    if dev.type == "cpu":
        memory._malloc_trim()
    weight_bytes = _weight_bytes(model, space)
    rss_model = _rss() - rss0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    opt = ZOOptimizer(params, lr=1e-3, eps=1e-3, sampler=sampler, seed=0)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    if dev.type == "cuda":
        torch.cuda.synchronize()
    memory.reset_peak(dev)
    before = _rss() if dev.type == "cpu" else 0
    t0 = time.perf_counter()
    opt.step(closure)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    hwm = memory.peak_bytes(dev)
    peak_total = hwm - rss0 if dev.type == "cpu" else hwm
    return {"arm": arm, "shape": shape, "device": device, "weight_bytes": weight_bytes, "rss_model": rss_model,
            "peak_step": hwm - before, "peak_total": peak_total, "step_seconds": seconds, "batch": batch, "seq": seq,
            "quant_float": quant_float,
            "saturated": dict(space.saturated) if space is not None else None}


# ---------------------------------------------------------------------------------------------------------------------
# All arms, one subprocess each
def run_arms(arms, shape: str, device: str, batch: int, seq: int, quant_float: str = "float32") -> list[dict]:
    out = []
    root = Path(__file__).resolve().parents[1]
    for arm in arms:
        call = f"measure_arm({arm!r}, {shape!r}, {device!r}, {batch}, {seq}, {quant_float!r})"
        code = f"import json; from benchmarks.quant_zo_memory import measure_arm; print('RESULT ' + json.dumps({call}))"
        env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(lines[-1][len("RESULT "):]))
    return out


def _mb(x: int) -> str:
    return f"{x / 1e6:.0f}"


def render(rows: list[dict], meta: dict) -> str:
    ref = next((r for r in rows if r["arm"] == "bf16+lora"), None)
    lines = [f"# ZO step memory on the quantised base ({meta['shape']}, {meta['device']})", "",
             f"{meta['date']}, commit {meta['commit']}, {meta['device_name']}, torch {meta['torch']}, "
             f"bitsandbytes {meta['bitsandbytes']}; batch {rows[0]['batch']} x {rows[0]['seq']} tokens; float parts "
             f"of the quantised arms in {rows[0]['quant_float']}.", "",
             "| arm | weight MB | resident after build MB | step's peak above it MB | peak of the step, total MB | "
             "total / bf16+lora | step s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['peak_total'] / max(ref['peak_total'], 1):.2f}" if ref else "-"
        lines.append(f"| {r['arm']} | {_mb(r['weight_bytes'])} | {_mb(r['rss_model'])} | {_mb(r['peak_step'])} | "
                     f"{_mb(r['peak_total'])} | {ratio} | {r['step_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--quant-float", default="float32", choices=("float32", "bfloat16"),
                    help="dtype of the quantised arms' float parts (embeddings, norms, head)")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    rows = run_arms(args.arms, args.shape, args.device, args.batch, args.seq, args.quant_float)
    import bitsandbytes

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    meta = {"shape": args.shape, "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": commit, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU"}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quant_zo_memory-{args.device}" + ("" if args.shape == "smollm2-135m" else f"-{args.shape}") + (
        "" if args.quant_float == "float32" else f"-{args.quant_float}")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    (out / f"{stem}.md").write_text(render(rows, meta))
    print(render(rows, meta))
    return {"meta": meta, "results": rows}


if __name__ == "__main__":
    main()
