"""Adapter snapshots and per-step direction statistics: what ``python -m zopro.train.visualize`` reads from a run.

A snapshot is one safetensors file ``<run>/snapshots/snap-<global step, 6 digits>.safetensors`` holding the policy
adapter (keys ``policy.<name>``) and, at iteration boundaries, the reward adapter and its score head (keys
``reward.<name>``, ``score.<name>``), with the step, iteration, mode and kind in the file's metadata. The training
loop takes one

* at the start of every iteration (kind ``iteration``: the reward adapter as refined after the previous one), before
  the checkpoint of that start is written;
* after every ``--snapshot-every`` steps inside an iteration (kind ``step``: policy only; the reward adapter only
  changes between iterations, so the iteration's start snapshot holds it);
* at the end of the last iteration (kind ``final``).

So there is at most one snapshot per global step, and the policy update of iteration ``i`` and the reward delta that
guides iteration ``i + 1`` are differences of two boundary snapshots (the very tensors ``train.end_iteration``
subtracts). Each file is published atomically before the checkpoint that moves past it; a resume deletes the files
of steps after its checkpoint, which it redoes, so a killed and resumed run holds the same files as an uninterrupted
one. Taking a snapshot only reads weights: it draws no random numbers and changes nothing the run computes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from zopro.train import checkpoint, files
from zopro.train.state import Progress

FOLDER = "snapshots"
_FILE = re.compile(r"snap-(\d{6,})\.safetensors")


def path_for(run_dir: Path, global_step: int) -> Path:
    return Path(run_dir) / FOLDER / f"snap-{global_step:06d}.safetensors"


def take(run_dir: Path, every: int, progress: Progress, mode: str, policy: dict[str, torch.Tensor],
         reward: dict[str, torch.Tensor] | None = None, kind: str = "step") -> Path | None:
    """Write the snapshot of ``progress``'s global step (``kind`` ``step``, ``iteration`` or ``final``); returns its
    path, or None when ``every`` is 0 (off) or a ``step`` snapshot is not due. ``reward``: the reward adapter and score
    head (boundary snapshots of runs whose reward model is an adapter on the shared base; None otherwise)."""
    step, global_step = progress.step, progress.global_step
    if every == 0 or (kind == "step" and global_step % every):
        return None
    tensors = {f"policy.{n}": p for n, p in policy.items()}
    for n, p in (reward or {}).items():  # the score head is already named score.*
        tensors[n if n.startswith("score.") else f"reward.{n}"] = p
    info = {"global_step": global_step, "iteration": progress.iteration, "step": step, "mode": mode, "kind": kind}
    path = path_for(run_dir, global_step)
    path.parent.mkdir(exist_ok=True)
    files.atomic_save_tensors(path, tensors, metadata={k: str(v) for k, v in info.items()})
    return path


def prune_after(run_dir: Path, global_step: int) -> None:
    """Remove snapshots of steps after ``global_step`` (a resume redoes those steps and writes them again) and any
    half-written temporary file."""
    folder = Path(run_dir) / FOLDER
    for f in sorted(folder.glob("*")) if folder.is_dir() else ():
        m = _FILE.fullmatch(f.name)
        if (m and int(m.group(1)) > global_step) or f.name.endswith(".tmp"):
            f.unlink()


_HEADER = ("global_step", "iteration", "step", "mode", "kind")


def listing(run_dir: Path) -> list[dict]:
    """The run's snapshots in step order: their metadata (numbers as ints) plus ``path``. Each file is read whole
    and its SHA-256 checked (:func:`zopro.train.files.load_tensors`; unchecked only for a run that shows it was
    made before snapshots carried one); ValueError naming the first damaged file."""
    out = []
    folder = Path(run_dir) / FOLDER
    legacy = checkpoint.made_before_output_checksums(run_dir)
    for f in sorted(folder.glob("snap-*.safetensors")) if folder.is_dir() else ():
        if not _FILE.fullmatch(f.name):
            continue
        _, info = files.load_tensors(f, unchecked_legacy=legacy)
        missing = [k for k in _HEADER if k not in info]
        try:
            if missing:
                raise ValueError(f"no {missing[0]!r} in its header")
            for key in ("global_step", "iteration", "step"):
                info[key] = int(info[key])
        except ValueError as err:
            raise ValueError(f"{f}: not a snapshot of this run ({err})") from None
        out.append({**info, "path": f})
    return sorted(out, key=lambda s: s["global_step"])


def load(path: Path, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one part (``policy``, ``reward`` or ``score``) of a snapshot, keys without the prefix."""
    prefix = part + "."
    with safe_open(str(path), framework="pt") as handle:
        return {k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------------
# Per-step statistics for metrics.jsonl
class StepProbe:
    """Reads the policy weights and the ZO optimiser's log before a training step, and after it returns the metrics
    fields the visualisation needs: ``moved`` (L2 norm of the step's change of the policy adapter, all modes) and,
    for ZO steps, per update ``zo_g`` (the projected gradient, from the losses the optimiser logged), ``zo_d`` (the
    mixing weight) and ``zo_guide_share`` (the sampler's ``guide_share``). No random numbers are drawn and no weight
    is written.

    The copy of the policy adapter is held in host memory, so a GPU run's peak memory of the update (``peak_update``)
    is the same as without it; on the CPU the resident-set peak includes it (9.8 MB for the default job's adapter,
    against a ~1.7 GB peak)."""

    def __init__(self, policy: dict[str, torch.Tensor], zo_opt=None):
        self.policy = policy
        self.before = {n: p.detach().to("cpu", copy=True) for n, p in policy.items()}
        self.zo_opt = zo_opt
        if zo_opt is not None:
            self.n_losses, self.t0 = len(zo_opt.log["losses"]), zo_opt.step_count

    def stats(self) -> dict:
        # a CPU-GPU sync point (the copy back to the host): a log line needs the number
        sq = sum(float((p.detach().cpu().double() - self.before[n].double()).pow(2).sum())
                 for n, p in self.policy.items())
        out = {"moved": math.sqrt(sq)}
        opt = self.zo_opt
        if opt is not None:
            per = (opt.q + 1) if opt.one_sided else 2 * opt.q
            losses = list(opt.log["losses"][self.n_losses:])
            steps = range(self.t0, opt.step_count)
            out["zo_g"] = [_projected_gradient(losses[i * per:(i + 1) * per], opt.eps, opt.q, opt.one_sided)
                           for i in range(len(steps))]
            out["zo_d"] = [opt.sampler.mixing(t) if hasattr(opt.sampler, "mixing") else 0.0 for t in steps]
            out["zo_guide_share"] = [opt.sampler.guide_share(t) for t in steps]
        return out


def _projected_gradient(losses: list[float], eps: float, q: int, one_sided: bool) -> float:
    """The step's g as ``ZOOptimizer._estimate`` forms it from the losses it logged (mean over the q directions)."""
    if one_sided:
        grads = [(plus - losses[0]) / eps for plus in losses[1:]]
    else:
        grads = [(losses[2 * j] - losses[2 * j + 1]) / (2 * eps) for j in range(q)]
    return sum(grads) / len(grads)
