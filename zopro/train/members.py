"""A ZO population scored in batched forwards (``--zo-batch-members``): the rows of member ``m`` see the policy with
its own delta ``+-eps z_j`` of the LoRA B tensors, applied as a per-row low-rank term inside the forward (as
multi-adapter serving and EGGROLL do), so several members share one forward and the weights are never perturbed.

Only directions that live in the LoRA B tensors as small matrices qualify: the ``core`` and ``singular`` spaces
(:class:`~zopro.samplers.Core`), where member ``m``'s delta of ``B [out, r]`` is ``sign * eps * U xi``. A LoRA layer
computes ``base(x) + s * B (A x)``; a forward hook on ``B`` adds ``(A x) delta_m^T`` to the rows of member ``m``, which
``s`` then scales as it scales ``B``'s own output: the forward of ``B + delta_m``, up to float rounding.
"""

from __future__ import annotations

import torch

from zopro.train.losses import reduce_ppo_terms
from zopro.train.models import POLICY
from zopro.train.rollout import rows_terms


class MemberDeltas:
    """Within ``with``: a batch of ``len(deltas[n]) * rows`` rows in which rows ``[m*rows, (m+1)*rows)`` see each
    policy LoRA B tensor ``n`` plus ``deltas[n][m]`` (``[members, out, r]``, by canonical parameter name)."""

    def __init__(self, bundle, deltas: dict[str, torch.Tensor], rows: int):
        self.bundle, self.deltas, self.rows = bundle, deltas, rows
        self.handles = []

    def _hook(self, delta: torch.Tensor):
        members = delta.shape[0]

        def hook(module, inputs, output):
            h = inputs[0]  # [members * rows, ..., r]
            grouped = h.reshape(members, self.rows, -1, h.shape[-1])
            extra = torch.einsum("mntr,mor->mnto", grouped, delta.to(h.dtype))
            return output + extra.reshape(output.shape)
        return hook

    def __enter__(self):
        for name, delta in self.deltas.items():
            module = self.bundle.model.get_submodule(f"{name.removesuffix('.weight')}.{POLICY}")
            self.handles.append(module.register_forward_hook(self._hook(delta)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False


def member_losses(bundle, optimizer, shards: list, ranks, seeds: list[int], eps: float, *, rows_of, loss: str,
                  clip: float, per_forward: int) -> list[float]:
    """The surrogate of each member ``(+eps z_j, -eps z_j)`` of ``seeds`` on this rank's ``rows_of(shard)`` rows, in
    :meth:`~zopro.ZOOptimizer.step_members`' order: ``per_forward`` members a forward; every rank's rows reduced in
    global row order, so every rank holds the same losses."""
    sampler = optimizer.sampler
    index = {name: i for i, name in enumerate(optimizer.names) if sampler.bases[i] is not None}
    members = [(seed, sign) for seed in seeds for sign in (1.0, -1.0)]
    local = []  # per shard: [members, n, c]
    for r in shards:
        rows = rows_of(r)
        n = len(rows)
        per_shard = []
        for start in range(0, len(members), per_forward):
            chunk = members[start:start + per_forward]
            deltas = {name: torch.stack([sign * eps * sampler.direction(seed, i, i) for seed, sign in chunk])
                      for name, i in index.items()}
            repeat = len(chunk)
            args = [t[rows].repeat(repeat, 1) for t in (r.sequences, r.attention_mask, r.response_mask)]
            with MemberDeltas(bundle, deltas, n):
                sums, tok = bundle.policy_logprobs(*args, temperature=r.logprob_temperature)
            terms = rows_terms(r, rows, sums, tok, loss=loss, clip=clip, repeat=repeat)
            per_shard.append(terms.cpu().view(repeat, n, -1))
        local.append(torch.cat(per_shard))
    rows_major = torch.cat(local, dim=1).transpose(0, 1).contiguous()  # [n_local, members, c]
    every = ranks.gather_rows(rows_major, "the members' loss terms")  # [n, members, c], global row order
    return [float(reduce_ppo_terms(every[:, m])) for m in range(len(members))]
