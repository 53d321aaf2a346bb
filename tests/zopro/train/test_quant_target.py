"""--zo-target scales / codes: bad combinations refused before anything loads; smoke runs on a bitsandbytes base move
its codes, record saturation, and resume to the same codes bit for bit."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="--zo-target codes needs bitsandbytes")

from zopro.train import checkpoint, main, run  # noqa: E402
from zopro.train.config import preset  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--zo-target", "codes"], "--zo-target: codes moves the quantised base: it needs --quantize nf4 or int8"),
    (["--zo-target", "scales", "--quantize", "nf4", "--model", "x", "--guide", "adam"],
     "--guide: --zo-target scales is guided by the policy adapter's B·A"),
    (["--zo-target", "codes", "--quantize", "int8", "--model", "x", "--weight-decay", "0.1"],
     "--weight-decay: must be 0 with --zo-target codes"),
    (["--zo-target", "codes", "--quantize", "int8", "--model", "x", "--algorithm", "rloo"],
     "--zo-target: codes is for ZO iterations"),
    (["--zo-target", "codes", "--quantize", "nf4"], "--zo-target: codes needs a bitsandbytes-quantised base"),
    (["--zo-target", "weights"], "--zo-target: 'weights' is not one of lora, scales, codes"),
    (["--zo-merge-adapter", "true", "--quantize", "nf4"], "--zo-merge-adapter: merges the adapter into the base codes"),
])
def test_bad_zo_target_combinations_fail_in_one_line_before_loading(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert main(["--preset", "smoke"] + argv + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from zopro.train.loading import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    tok = build_tiny_tokenizer()
    build_tiny_model(len(tok), seed=0, hidden=64, layers=2, heads=4).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _cfg(tmp_path, tiny_dir, name, quantize, target="codes"):
    return dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / name), threads=1, model=str(tiny_dir),
                               quantize=quantize, zo_target=target)


def _initial_codes(cfg):
    from zopro.train.loading import load_models
    from zopro.train.quant_target import code_space

    bundle, _ = load_models(cfg, torch.device("cpu"))
    return code_space(bundle).state()


def test_nf4_codes_run_moves_the_base_and_resumes_to_the_same_codes(tmp_path, tiny_dir):
    cfg = _cfg(tmp_path, tiny_dir, "full", "nf4")
    run(cfg, progress=False)
    full = torch.load(tmp_path / "full" / "base_quantised.pt")
    start = _initial_codes(cfg)
    codes = [k for k in full if k.startswith("codes.")]
    assert codes and any(not torch.equal(full[k], start[k]) for k in codes)  # the ZO iteration moved the codes
    assert all(torch.equal(full[k], start[k]) for k in full if k.startswith("scales."))  # absmax kept
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in records] == ["first-order"] * 2 + ["zo-codes-targeted"] * 2
    assert all(isinstance(r["saturated_update"], int) and r["saturated_probe"] == 0 for r in records)

    killed = _cfg(tmp_path, tiny_dir, "killed", "nf4")
    with pytest.raises(KeyboardInterrupt):
        run(killed, progress=False, stop_after_steps=3)  # after the first ZO step
    run(killed, resume=True, progress=False)
    resumed = torch.load(tmp_path / "killed" / "base_quantised.pt")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_int8_codes_run_moves_the_base(tmp_path, tiny_dir):
    cfg = _cfg(tmp_path, tiny_dir, "run", "int8")
    run(cfg, progress=False)
    final = torch.load(tmp_path / "run" / "base_quantised.pt")
    start = _initial_codes(cfg)
    assert any(not torch.equal(final[k], start[k]) for k in final if k.startswith("codes."))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in records][-1] == "zo-codes-targeted"
    assert all(r["saturated_probe"] >= 0 and r["saturated_update"] >= 0 for r in records)


def test_nf4_scales_run_moves_the_nested_absmax_and_keeps_the_codes(tmp_path, tiny_dir):
    cfg = _cfg(tmp_path, tiny_dir, "run", "nf4", target="scales")
    run(cfg, progress=False)
    final = torch.load(tmp_path / "run" / "base_quantised.pt")
    start = _initial_codes(cfg)
    assert all(torch.equal(final[k], start[k]) for k in final if k.startswith("codes."))
    assert any(not torch.equal(final[k], start[k]) for k in final if k.startswith("scales."))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in records][-1] == "zo-targeted"


def test_merged_adapter_leaves_b_zero_and_keeps_its_product_as_the_guide(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    cfg = dataclasses.replace(_cfg(tmp_path, tiny_dir, "run", "int8"), zo_merge_adapter=True)
    run(cfg, progress=False)
    policy = load_file(str(tmp_path / "run" / "policy_adapter.safetensors"))
    bs = [t for k, t in policy.items() if "lora_B" in k]
    assert bs and all(not t.any() for t in bs)  # merged into the base, then zeroed
    assert any(t.any() for k, t in policy.items() if "lora_A" in k)
    final = torch.load(tmp_path / "run" / "base_quantised.pt")
    start = _initial_codes(cfg)
    assert any(not torch.equal(final[k], start[k]) for k in final if k.startswith("codes."))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    zo = [r for r in records if r["mode"] == "zo-codes-targeted"]
    assert zo and all(share > 0 for r in zo for share in r["zo_guide_share"])  # B·A still guides


def test_nf4_base_passes_gradients_after_an_inference_forward(tmp_path, tiny_dir):
    # bitsandbytes repacks an NF4 weight for an inference-only CPU kernel (no backward) at the first no-grad forward
    # in eval mode; after a rollout's generation the first-order gradient must still flow through every quantised
    # matmul into its input (the adapters of earlier layers learn through them)
    import bitsandbytes as bnb

    from zopro.train.loading import load_models

    bundle, _ = load_models(_cfg(tmp_path, tiny_dir, "x", "nf4", target="lora"), torch.device("cpu"))
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    mask, response = torch.ones_like(ids), torch.zeros_like(ids)
    response[:, 6:] = 1
    bundle.policy_logprobs(ids, mask, response)  # an inference forward, as a rollout's
    inputs = []

    def keep(module, args):
        if args[0].requires_grad:
            args[0].retain_grad()
            inputs.append(args[0])

    layers = [m for m in bundle.base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    hooks = [m.register_forward_pre_hook(keep) for m in layers]
    sums, _ = bundle.policy_logprobs(ids, mask, response, grad=True)
    sums.sum().backward()
    for h in hooks:
        h.remove()
    assert len(layers) == 14 and len(inputs) >= 7  # layer 1's inputs depend on layer 0's adapters
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in inputs)


def test_codes_arm_resumes_from_an_iteration0_checkpoint_of_a_lora_run(tmp_path, tiny_dir):
    # benchmarks.zo_ablation shares iteration 0 between arms: a --zo-target codes arm continues a --zo-target lora
    # run's iteration-0 checkpoint (no quantised base in it: the codes have not moved yet); past iteration 0 a
    # checkpoint without one is refused
    cfg = _cfg(tmp_path, tiny_dir, "shared", "nf4", target="lora")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False, stop_after_steps=cfg.steps_per_iteration - 1)  # inside iteration 0
    config = json.loads((tmp_path / "shared" / "config.json").read_text())
    checkpoint.rewrite_config(tmp_path / "shared", json.dumps({**config, "zo_target": "codes"}))
    run(dataclasses.replace(cfg, zo_target="codes"), resume=True, progress=False)
    moved = torch.load(tmp_path / "shared" / "base_quantised.pt")
    start = _initial_codes(_cfg(tmp_path, tiny_dir, "shared", "nf4"))
    assert any(not torch.equal(moved[k], start[k]) for k in moved if k.startswith("codes."))

    late = _cfg(tmp_path, tiny_dir, "late", "nf4", target="lora")
    with pytest.raises(KeyboardInterrupt):
        run(late, progress=False, stop_after_steps=late.steps_per_iteration + 1)  # inside iteration 1
    config = json.loads((tmp_path / "late" / "config.json").read_text())
    checkpoint.rewrite_config(tmp_path / "late", json.dumps({**config, "zo_target": "codes"}))
    with pytest.raises(ValueError, match="no quantised base to restore"):
        run(dataclasses.replace(late, zo_target="codes"), resume=True, progress=False)


def test_two_ranks_move_the_codes_as_one_process_with_the_same_shards(tmp_path, tiny_dir):
    # data-parallel ZO on the codes: every rank holds the whole base and applies the same update (the same seeds, the
    # same all-reduced projected gradient, the same stochastic rounding), so a rank whose codes drifted would change
    # the later steps' losses and the held-out answers it generates (the evaluation is split across the ranks)
    import os
    import subprocess
    import sys
    from pathlib import Path

    split = {"eval_batch": 2, "n_eval_prompts": 3}
    one = dataclasses.replace(_cfg(tmp_path, tiny_dir, "one", "nf4"), data_shards=2, **split)
    run(one, progress=False)
    root = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "zopro.train", "--preset", "smoke", "--threads", "1", "--model", str(tiny_dir), "--quantize", "nf4",
           "--zo-target", "codes", "--eval-batch", "2", "--n-eval-prompts", "3", "--output-dir", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = [torch.load(tmp_path / name / "base_quantised.pt") for name in ("one", "two")]
    assert codes[0].keys() == codes[1].keys() and all(torch.equal(codes[0][k], codes[1][k]) for k in codes[0])
    timing = ("step_time", "peak_rollout", "peak_update")
    metrics = [[{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two")]
    assert metrics[0] == metrics[1] and metrics[0][-1]["mode"] == "zo-codes-targeted"
    samples = [(tmp_path / name / "eval_samples.jsonl").read_text() for name in ("one", "two")]
    assert samples[0] == samples[1]
