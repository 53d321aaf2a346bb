"""zopro.train.state: the run's state written to a checkpoint and read back through one description, in the format
earlier runs wrote (file names, meta keys and their order)."""

import json

import pytest
import torch

from zopro.train import checkpoint
from zopro.train.state import Guides, LiveState, Progress, RunState

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
    state = RunState(Progress(phase="train", iteration=1, step=2, global_step=4, evaluation={"b": 1, "a": [0.5]},
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
    assert list(back.progress.evaluation) == ["b", "a"]
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
