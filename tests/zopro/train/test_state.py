"""zopro.train.state: the run's state written to a checkpoint and read back through one description, in the format
earlier runs wrote (file names, meta keys and their order)."""

import json

import pytest
import torch

from zopro.train import checkpoint
from zopro.train.state import Evaluation, Guides, HeldOut, LiveState, Progress, RunState

# meta.json's keys in the order every earlier run wrote them (the initial dict, then metrics_sha256 at the first save)
LEGACY_META_KEYS = ["phase", "iteration", "step", "global_step", "evaluation", "metrics_bytes", "reward_losses",
                    "skipped", "metrics_sha256"]
# keys added since, after the legacy ones: the in-run evaluations and the training's forward token-passes
META_KEYS = LEGACY_META_KEYS + ["curve", "token_passes"]


def _tensors(*names, value=1.0):
    return {n: torch.full((2, 3), value) for n in names}


def test_meta_keys_and_order_are_the_legacy_ones():
    assert list(Progress().to_meta()) == META_KEYS
    legacy = {k: v for k, v in Progress(phase="train", global_step=3).to_meta().items() if k in LEGACY_META_KEYS}
    old = Progress.from_meta(legacy)  # a checkpoint written before the new keys
    assert old.curve == [] and old.token_passes == 0 and old.global_step == 3


def test_round_trip_through_a_checkpoint(tmp_path):
    evaluation = Evaluation("mean judge score", 2, 1, HeldOut("mean judge score", [0.25, 0.75], [["a"], ["b c"]],
                                                               [0.0, 0.0], [1.0, 2.0]))
    state = RunState(Progress(phase="train", iteration=1, step=2, global_step=4, evaluation=evaluation,
                              metrics_bytes=10, reward_losses=[0.25], skipped=1, metrics_sha256="ab"),
                     iter_start=_tensors("policy.x", "reward.x"))
    state.guides = Guides(prev=_tensors("x", value=2.0), delta=_tensors("x", value=3.0))
    live = LiveState(trainable=_tensors("policy.x"), value=_tensors("v", value=4.0),
                     objects={"zo_optimizer": {"step": 3}})
    name = checkpoint.save(tmp_path, "000004-train", **state.to_checkpoint(live))
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
        "guides_delta.safetensors", "guides_prev.safetensors", "iter_start.safetensors", "manifest.json", "meta.json",
        "trainable.safetensors", "value.safetensors", "zo_optimizer.pt"]
    assert list(json.loads((tmp_path / name / "meta.json").read_text())) == META_KEYS
    back, live_back = RunState.from_checkpoint(checkpoint.load(tmp_path))
    assert back.progress == state.progress
    # the evaluation under the keys earlier runs wrote, in their order
    assert list(json.loads((tmp_path / name / "meta.json").read_text())["evaluation"]) == [
        "metric", "before", "n", "samples", "before_per_prompt", "before_texts", "before_kl", "before_tokens"]
    for got, want in ((back.iter_start, state.iter_start), (back.guides.prev, state.guides.prev),
                      (back.guides.delta, state.guides.delta), (live_back.trainable, live.trainable),
                      (live_back.value, live.value)):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert live_back.objects == {"zo_optimizer": {"step": 3}}


def test_optional_parts_are_absent_not_empty(tmp_path):
    name = checkpoint.save(tmp_path, "000000-reward_init",
                           **RunState().to_checkpoint(LiveState(trainable=_tensors("policy.x"))))
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["manifest.json", "meta.json",
                                                                   "trainable.safetensors"]
    back, live = RunState.from_checkpoint(checkpoint.load(tmp_path))
    assert back.iter_start is None and back.guides is None and live.value is None and live.objects == {}


def test_unknown_meta_key_is_refused():
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        Progress.from_meta({**Progress().to_meta(), "colour": "red"})


def test_a_finished_evaluation_keeps_the_legacy_keys_and_reads_back():
    before = HeldOut("mean judge score", [0.0, 0.5], [["a"], ["b"]], [0.0, 0.0], [1.0, 1.0])
    after = HeldOut("mean judge score", [0.5, 1.0], [["c"], ["d e"]], [0.5, 1.5], [1.0, 2.0])
    ev = Evaluation("mean judge score", 2, 1, before, after, 0.5, 0.0, {"score": 0.75})
    meta = ev.to_meta()
    assert list(meta) == ["metric", "before", "n", "samples", "before_per_prompt", "before_texts", "before_kl",
                          "before_tokens", "after", "change", "change_se", "after_per_prompt", "after_texts",
                          "after_kl", "after_tokens", "held_out"]
    assert (meta["before"], meta["after"]) == (0.25, 0.75)
    assert Evaluation.from_meta(json.loads(json.dumps(meta))) == ev
    # summary.json: the numbers without the answers, as before
    assert ev.summary() == {k: v for k, v in meta.items() if not k.startswith(("before_", "after_"))}
    legacy = {k: v for k, v in meta.items() if k not in ("before_kl", "before_tokens", "after_kl", "after_tokens")}
    assert Evaluation.from_meta(legacy).after.kl is None  # a run saved before the KL was kept
    with pytest.raises(ValueError, match="meta.json: the held-out evaluation has no 'before_texts'"):
        Evaluation.from_meta({k: v for k, v in meta.items() if k != "before_texts"})
