"""``zopro.train.updaters.surrogate`` and ``first_order_step`` on hand-built rollouts: the value of the PPO-clip
surrogate and the sign of its gradient along known directions, against numbers computed by hand.

The policy is a stub whose log-probs are the rollout's old log-probs plus one parameter per row (``theta[b]`` is row
b's log-ratio), so each partial derivative of the surrogate is one row's term, written out below.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from zopro.train.updaters import first_order_step, surrogate

CLIP = 0.2
ADVANTAGES = [1.0, -1.0, 2.0, -0.5]
OLD = [-3.0, -2.0, -4.0, -1.0]  # summed response log-probs under the sampling policy
RATIOS = [1.5, 0.5, 1.1, 1.0]  # row 0 clipped above, row 1 clipped below, rows 2 and 3 inside [0.8, 1.2]


class StubPolicy:
    """``policy_logprobs`` of row b (its id in ``sequences[:, 0]``): sum = OLD[b] + theta[b], spread over 2 tokens."""

    def __init__(self, log_ratios):
        self.theta = torch.nn.Parameter(torch.tensor(log_ratios, dtype=torch.float32))

    def policy_logprobs(self, sequences, attention_mask, response_mask, *, grad=False, temperature=1.0):
        self.temperature = temperature  # the log-probs of the policy that sampled: the rollout's temperature
        b = sequences[:, 0]
        sums = torch.tensor(OLD)[b] + self.theta[b]
        tok = torch.stack([sums / 2, sums / 2], 1)
        return (sums, tok) if grad else (sums.detach(), tok.detach())


def _rollout():
    n = len(ADVANTAGES)
    old = torch.tensor(OLD)
    return SimpleNamespace(sequences=torch.arange(n)[:, None].repeat(1, 2), attention_mask=torch.ones(n, 2),
                           response_mask=torch.ones(n, 2, dtype=torch.long), policy_logps=old,
                           policy_token_logps=torch.stack([old / 2, old / 2], 1), advantages=torch.tensor(ADVANTAGES),
                           logprob_temperature=0.7)


SEQUENCE = dict(loss="sequence", clip=CLIP)


def test_sequence_surrogate_value_by_hand():
    policy = StubPolicy([math.log(r) for r in RATIOS])
    value = surrogate(policy, _rollout(), torch.arange(4), **SEQUENCE).item()
    # per row max(-A r, -A clip(r, 0.8, 1.2)):
    #   row 0: A = 1,    r = 1.5: max(-1.5, -1.2) = -1.2
    #   row 1: A = -1,   r = 0.5: max(0.5, 0.8)   = 0.8
    #   row 2: A = 2,    r = 1.1: -2.2
    #   row 3: A = -0.5, r = 1:   0.5
    # mean: (-1.2 + 0.8 - 2.2 + 0.5) / 4 = -0.525
    assert value == pytest.approx(-0.525, abs=1e-6)
    assert policy.temperature == 0.7
    assert surrogate(policy, _rollout(), torch.tensor([0, 2]), **SEQUENCE).item() == pytest.approx(-1.7, abs=1e-6)


def test_token_surrogate_value_by_hand():
    # each row's two tokens carry half its log-ratio: token ratios sqrt(1.5), sqrt(0.5), sqrt(1.1), 1
    policy = StubPolicy([math.log(r) for r in RATIOS])
    r = _rollout()
    value = surrogate(policy, r, torch.arange(4), loss="token", clip=CLIP)
    s = [math.sqrt(x) for x in RATIOS]  # 1.2247 (clipped to 1.2), 0.7071 (clipped to 0.8), 1.0488, 1
    per_row = [max(-1.0 * s[0], -1.2), max(1.0 * s[1], 0.8), -2.0 * s[2], 0.5 * s[3]]
    assert value.item() == pytest.approx(sum(per_row) / 4, abs=1e-6)  # 2 tokens per row: the token mean
    assert value.item() == pytest.approx((-1.2 + 0.8 - 2.0 * math.sqrt(1.1) + 0.5) / 4, abs=1e-6)


def test_gradient_signs_along_known_directions():
    policy = StubPolicy([math.log(r) for r in RATIOS])
    loss = surrogate(policy, _rollout(), torch.arange(4), **SEQUENCE, grad=True)
    (grad,) = torch.autograd.grad(loss, [policy.theta])
    # d/dtheta_b of -A_b exp(theta_b) / 4 inside the clip range, 0 where the clipped term is the max:
    # raising the log-prob of the positive-advantage row 2 lowers the loss (-2.2 / 4); raising that of the
    # negative-advantage row 3 raises it (0.5 / 4); the clipped rows 0 and 1 do not move it
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -0.55, 0.125]), rtol=0, atol=1e-6)


def test_first_order_step_moves_towards_the_advantage():
    # at the sampling policy (every ratio 1) the step raises the log-probs of positive-advantage rows and lowers those
    # of negative ones: gradient -A_b / 4 = (-0.25, 0.25, -0.5, 0.125), norm 0.625 (< 1: not clipped); SGD lr 0.1
    policy = StubPolicy([0.0, 0.0, 0.0, 0.0])
    opt = torch.optim.SGD([policy.theta], lr=0.1)
    loss, norm = first_order_step(policy, [_rollout()], opt, **SEQUENCE)
    assert loss == pytest.approx(-sum(ADVANTAGES) / 4, abs=1e-6)  # -mean(A) at ratio 1
    assert norm == pytest.approx(math.sqrt(0.25**2 * 2 + 0.5**2 + 0.125**2), abs=1e-6)
    torch.testing.assert_close(policy.theta.detach(), 0.1 * torch.tensor([0.25, -0.25, 0.5, -0.125]), rtol=0,
                               atol=1e-7)
