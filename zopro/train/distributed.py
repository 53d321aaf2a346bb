"""Data-parallel ZOPrO on ``torch.distributed``: ``torchrun --nproc-per-node N -m zopro.train ...``.

ZO is the easiest optimiser to distribute: every rank perturbs with the same seed, evaluates its own share of the
step's rows, and only a few floats per row cross the network. The rules, in the order a step meets them:

* **Shards.** A step's prompts (the same on every rank: one seed picks them) are cut into ``--data-shards`` equal,
  contiguous shards (0: one per rank). Shard ``j`` is sampled with its own seed, ``derive_seed(rollout seed, j)``
  (the rollout seed itself when there is one shard: :func:`zopro.train.rollout.shard_seed`), scored and given
  its RLOO advantages on its own (a prompt's group of answers never leaves its shard), and rank ``r`` of ``W``
  holds shards ``r*S/W .. (r+1)*S/W - 1``. A step's rows are therefore a function of the shards, not of the
  ranks: a single process with ``--data-shards S`` computes the very rows ``S / m`` ranks compute.
* **One step path.** One process is rank 0 of 1 holding one shard; the step functions
  (:mod:`zopro.train.updaters`) take this rank's shards and the :class:`Ranks`, whose collectives do nothing in one
  process.
* **ZO steps.** Each closure evaluates this rank's rows of the minibatch (each shard's rows are cut into
  ``--minibatches`` chunks; minibatch ``m`` is chunk ``m`` of every shard), and all-gathers the per-row terms of the
  surrogate (sequence loss: one float per row; token loss: the row's sum and token count), then reduces them in
  global row order. Every rank so holds the same loss, bit for bit, forms the same projected gradient and applies the
  same update: the weights stay identical without being sent, and the result is bit for bit that of one process with
  the same shards (an all-gather copies; the order of the sum is fixed).
* **First-order steps** (iteration 0, ``--algorithm rloo``): each shard's gradient is accumulated on its own (in
  chunks of ``--fo-microbatch`` rows, weighted by the shard's share of the global loss), the shards of a rank are
  summed in order, and one all-reduce sums the ranks' gradients before clipping and AdamW. This is an explicit
  all-reduce rather than ``DistributedDataParallel``: the policy's forward passes are methods of the bundle
  (log-probs under an adapter of a shared base), not one ``module.forward`` that DDP could wrap, and only the policy
  adapter's tensors take part. With one shard per rank on two ranks the sum is ``a + b`` as in a single process, so
  bit for bit; with more ranks the backend chooses the order of the sum (the difference is float rounding of the
  gradient, ~1e-7 relative per step).
* **The reward adapter** is trained the same way: its preference pairs are cut into the data shards, a rank samples
  and judges only its shards' pairs, and each Bradley-Terry step sums the shards' gradients of their rows' share of
  the batch loss, then all-reduces (:mod:`zopro.train.reward_adapter`). After each reward training rank 0's trainable
  tensors are broadcast (the trainable size, once per phase), so a nondeterministic kernel cannot let ranks drift.
  Guides are computed on every rank from identical weights. The held-out evaluation's generate calls are dealt out
  to the ranks, its answers gathered, and rank 0 scores them with the single process's judge calls.
* **Files.** Only rank 0 writes the run directory (config, metrics, checkpoints, snapshots, ZO logs, outputs); a
  resume reads the checkpoint on every rank, so the run directory must be on a file system that every node sees.
* **Failure.** A rank that cannot reach another during a collective raises :class:`RankLost`, whose message names
  the rank and says how to continue (``--resume``); configuration errors are raised on every rank before anything is
  written (rank 0's checks of the run directory are broadcast to the others).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, evaluated when the module is first
# imported. transformers' from_pretrained imports it; imported after the process group exists, its ten defaults would
# hold the group, destroy_process_group (tear_down, or a library user's) could not free it, and its threads (gloo's,
# NCCL's watchdog) would live on until the interpreter's exit destroyed them: a finished rank now and then aborted
# there ("terminate called without an active exception", SIGABRT). Imported here, before any group, they are None.
import torch.distributed.nn  # noqa: F401


class RankLost(RuntimeError):
    """A collective failed: another rank died, was killed or stopped answering."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` processes, ``shards`` data shards per step."""

    rank: int = 0
    world: int = 1
    shards: int = 1
    comm_device: torch.device = torch.device("cpu")  # where tensors go for a collective (nccl: this rank's GPU)
    owns_group: bool = False  # set_up initialised the process group, so tear_down destroys it

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory (rank 0 only)."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the job's data is cut into several shards (reward pairs are then cut the same way)."""
        return self.shards > 1 or self.world > 1

    @property
    def local_shards(self) -> range:
        per = self.shards // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    # -- collectives: each failure becomes RankLost -----------------------------------------------------------------
    def _collective(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 (gloo and nccl raise RuntimeError or DistBackendError subclasses)
            first = (str(err).strip().splitlines() or [""])[0]
            raise RankLost(f"rank {self.rank} of {self.world}: lost contact with another rank during {what} "
                           f"({type(err).__name__}: {first}); the job stops: continue it with --resume from its "
                           "last checkpoint") from None

    def gather_rows(self, x: torch.Tensor, what: str = "a ZO loss") -> torch.Tensor:
        """The ranks' ``x`` (same shape on every rank) concatenated along dim 0 in rank order; ``x`` itself in one
        process."""
        if self.world == 1:
            return x
        local = x.detach().to(self.comm_device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        self._collective(what, dist.all_gather, parts, local)
        return torch.cat(parts).to(x.device)

    def all_reduce_sum_(self, tensors: list[torch.Tensor], what: str = "a gradient all-reduce") -> None:
        """Sum ``tensors`` (same dtype, any devices) over the ranks, in place, with one collective on a flat buffer."""
        if self.world == 1 or not tensors:
            return
        # each piece to the collective's device first: the gradients live on the GPU, the loss and counts on the host
        flat = torch.cat([t.reshape(-1).to(self.comm_device) for t in tensors])
        self._collective(what, dist.all_reduce, flat)
        start = 0
        for t in tensors:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()

    def gather_json(self, obj, what: str) -> list:
        """Every rank's ``obj`` (JSON data), in rank order: UTF-8 bytes in tensors, no pickle."""
        if self.world == 1:
            return [obj]
        data = json.dumps(obj).encode("utf-8")
        size = torch.tensor([len(data)], dtype=torch.long, device=self.comm_device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        self._collective(what, dist.all_gather, sizes, size)
        sizes = [int(s.item()) for s in sizes]
        buf = torch.zeros(max(sizes), dtype=torch.uint8)
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # json.dumps is never empty
        buf = buf.to(self.comm_device)
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        self._collective(what, dist.all_gather, bufs, buf)
        return [json.loads(b[:n].cpu().numpy().tobytes().decode("utf-8")) for b, n in zip(bufs, sizes, strict=True)]

    def broadcast_(self, tensors: list[torch.Tensor], what: str = "a weight broadcast") -> None:
        """Rank 0's ``tensors`` on every rank, in place."""
        if self.world == 1:
            return
        for t in tensors:
            buf = t.detach().to(self.comm_device).contiguous()
            self._collective(what, dist.broadcast, buf, 0)
            with torch.no_grad():
                t.copy_(buf)

    def broadcast_text(self, text: str | None, what: str) -> str | None:
        """Rank 0's ``text`` (or None) on every rank: UTF-8 bytes in a tensor, no pickle."""
        if self.world == 1:
            return text
        data = b"" if text is None else text.encode("utf-8")
        head = torch.tensor([len(data) if text is not None else -1], dtype=torch.long, device=self.comm_device)
        self._collective(what, dist.broadcast, head, 0)
        n = int(head.item())
        if n < 0:
            return None
        buf = torch.zeros(n, dtype=torch.uint8, device=self.comm_device)
        if self.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if n:
            self._collective(what, dist.broadcast, buf, 0)
        return bytes(buf.cpu().tolist()).decode("utf-8")

    def barrier(self, what: str) -> None:
        if self.world > 1:
            self._collective(what, dist.barrier)


SOLO = Ranks()  # one process: rank 0 of 1, one data shard


# ---------------------------------------------------------------------------------------------------------------------
# Set-up from torchrun's environment
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer (torchrun sets it)") from None


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``(0, 1, 0)``
    without them."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not describe a rank of "
                         "a job (launch with torchrun)")
    return rank, world, local


def check(cfg, world: int) -> int:
    """The number of data shards of ``cfg`` on ``world`` ranks; raises ValueError, naming the flag, for a combination
    that does not split evenly. Pure: every rank raises the same error before anything is written."""
    shards = cfg.data_shards or world
    if shards % world:
        raise ValueError(f"--data-shards {shards}: must be a multiple of the number of ranks ({world}), so that every "
                         "rank holds as many shards")
    if shards == 1:
        return shards
    if cfg.algorithm == "ppo":
        raise ValueError(f"--algorithm ppo: not data-parallel (its value model trains per step on the whole rollout); "
                         f"run it in one process with --data-shards 1 (got {shards} shards on {world} ranks)")
    if cfg.prompts_per_step % shards:
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step}: does not split evenly into {shards} data shards "
                         f"({world} ranks; --data-shards {cfg.data_shards}): use a multiple of {shards}")
    rows = cfg.prompts_per_step // shards * cfg.k
    if rows % cfg.minibatches:
        raise ValueError(f"--minibatches {cfg.minibatches}: must divide each shard's {rows} rows "
                         f"(--prompts-per-step {cfg.prompts_per_step} / {shards} shards x --k {cfg.k})")
    return shards


def set_up(cfg, device: torch.device) -> Ranks:
    """This process's :class:`Ranks`: checks ``cfg`` against the job (:func:`check`), then joins the process group
    (gloo on CPU, nccl on CUDA; torchrun's ``MASTER_ADDR``/``MASTER_PORT``), unless it exists already or the job is
    one process."""
    rank, world, local = world_from_env()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    shards = check(cfg, world)
    if world == 1:
        return Ranks(shards=shards)
    comm = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local)
        comm = torch.device("cuda", local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=comm if device.type == "cuda" else None)
    return Ranks(rank=rank, world=world, shards=shards, comm_device=comm, owns_group=owns)


def resolve(cfg, ranks: Ranks):
    """``cfg`` with ``--data-shards`` 0 replaced by its value on this job when the job has several ranks (saved in the
    run's config.json, so a resume in a single process computes the same shards); a one-process config is kept as
    given, so its config.json is unchanged."""
    if ranks.world > 1 and cfg.data_shards == 0:
        return dataclasses.replace(cfg, data_shards=ranks.shards)
    return cfg


def tear_down(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Gradients summed over shards and ranks
class ShardGradients:
    """The gradient of a loss summed over data shards: each shard's backward passes (after ``zero_grad``) are taken
    into per-parameter sums in shard order, then one all-reduce adds the ranks' sums and sets them as ``.grad``.
    With one shard per rank on two ranks the result is ``a + b`` as in one process (``0 + a`` is ``a``): bit for bit."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.sums = [torch.zeros_like(p) for p in params]
        self.total = torch.zeros((), dtype=torch.float32)

    def backward(self, value: torch.Tensor) -> None:
        value.backward()
        self.total = self.total + value.detach().float().cpu()

    def take(self) -> None:
        """Add the current ``.grad`` (one shard's) to the sums."""
        for acc, p in zip(self.sums, self.params, strict=True):
            if p.grad is not None:
                acc.add_(p.grad)

    def reduce_(self, ranks: Ranks, what: str) -> float:
        """Sum over the ranks, set each parameter's ``.grad``; returns the whole loss."""
        ranks.all_reduce_sum_(self.sums + [self.total.view(1)], what)
        for acc, p in zip(self.sums, self.params, strict=True):
            p.grad = acc
        return float(self.total)


# ---------------------------------------------------------------------------------------------------------------------
# Files: only rank 0 writes
class NullLog:
    """The metrics log of a rank that writes nothing (:class:`~zopro.train.report.MetricsLog`'s interface)."""

    def size(self) -> int:
        return 0

    def truncate(self, n_bytes: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def read(self) -> list[dict]:
        return []


def sync_trainable_(bundle, ranks: Ranks) -> None:
    """Rank 0's trainable tensors (policy, reward adapter, score head) on every rank.

    Every rank already computes the same weights (the same all-reduced gradients, the same AdamW steps); this one
    broadcast per phase, of the trainable tensors only, keeps a nondeterministic kernel on one rank (a GPU's atomics)
    from letting the ranks drift apart over a long job."""
    if ranks.world == 1:
        return
    state = bundle.trainable_state()
    ranks.broadcast_(list(state.values()), "the reward model's broadcast")
    bundle.load_trainable_state_(state)
