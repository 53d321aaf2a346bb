"""zopro.train.losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from zopro.train.losses import (
    bradley_terry_loss,
    kl_penalised_rewards,
    ppo_clip_loss_sequence,
    ppo_clip_loss_token,
    ppo_clip_terms,
    reduce_ppo_terms,
    rloo_advantages,
)

F64 = torch.float64


# --- RLOO -----------------------------------------------------------------------------------------------------------


def test_rloo_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]], dtype=F64)
    # Row 0: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5. Row 1: 0 - 1.5, 0 - 1.5, 3 - 0.
    expected = torch.tensor([[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]], dtype=F64)
    torch.testing.assert_close(rloo_advantages(rewards), expected, rtol=0, atol=0)


def test_rloo_advantages_k2_is_difference():
    rewards = torch.tensor([[0.5, -0.5], [3.0, 1.0]])
    torch.testing.assert_close(rloo_advantages(rewards), torch.tensor([[1.0, -1.0], [2.0, -2.0]]), rtol=0, atol=0)


def test_rloo_advantages_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="rewards"):
        rloo_advantages(torch.ones(4))
    with pytest.raises(TypeError, match="rewards"):
        rloo_advantages([[1.0, 2.0]])


# --- KL-penalised reward --------------------------------------------------------------------------------------------


def test_kl_penalised_rewards_hand_computed():
    scores = torch.tensor([[1.0, 2.0]], dtype=F64)
    policy = torch.tensor([[-3.0, -5.0]], dtype=F64)
    ref = torch.tensor([[-4.0, -4.0]], dtype=F64)
    rewards, kl = kl_penalised_rewards(scores, policy, ref, kl_coef=0.5)
    torch.testing.assert_close(kl, torch.tensor([[1.0, -1.0]], dtype=F64), rtol=0, atol=0)
    # 1 - 0.5*1 = 0.5; 2 - 0.5*(-1) = 2.5
    torch.testing.assert_close(rewards, torch.tensor([[0.5, 2.5]], dtype=F64), rtol=0, atol=0)


def test_kl_penalised_rewards_errors():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="ref_logprob_sums"):
        kl_penalised_rewards(x, x, torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        kl_penalised_rewards(x, x, x, -0.1)
    with pytest.raises(TypeError, match="kl_coef"):
        kl_penalised_rewards(x, x, x, "0.1")


# --- PPO clip, sequence level ---------------------------------------------------------------------------------------

# (ratio, advantage, per-item loss with clip 0.2), each worked out by hand:
PPO_CASES = [
    (1.5, 1.0, -1.2),  # A > 0, ratio above 1.2: clipped, max(-1.5, -1.2) = -1.2
    (0.5, -1.0, 0.8),  # A < 0, ratio below 0.8: clipped, max(0.5, 0.8) = 0.8
    (0.5, 1.0, -0.5),  # A > 0, ratio below 0.8: unclipped wins, max(-0.5, -0.8) = -0.5
    (1.5, -1.0, 1.5),  # A < 0, ratio above 1.2: unclipped wins, max(1.5, 1.2) = 1.5
    (1.1, -3.0, 3.3),  # inside the band: both equal, 3.3
    (1.0, 2.0, -2.0),  # ratio 1: -A
]


def test_ppo_clip_loss_sequence_hand_computed():
    ratio = torch.tensor([c[0] for c in PPO_CASES], dtype=F64)
    adv = torch.tensor([c[1] for c in PPO_CASES], dtype=F64)
    old = torch.tensor([-2.0, -7.0, -1.0, -3.0, -4.0, -5.0], dtype=F64)
    new = (old + ratio.log()).requires_grad_(True)
    loss = ppo_clip_loss_sequence(new, old, adv, clip=0.2)
    expected = sum(c[2] for c in PPO_CASES) / len(PPO_CASES)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # Gradient: zero on the clipped branch, -A * ratio / N elsewhere.
    loss.backward()
    expected_grad = [0.0, 0.0, -0.5 / 6, 1.5 / 6, 3.3 / 6, -2.0 / 6]
    torch.testing.assert_close(new.grad, torch.tensor(expected_grad, dtype=F64), rtol=0, atol=1e-12)


def test_ppo_clip_loss_sequence_clip_width():
    # ratio 1.5 and A = 1 with clip 0.1: clipped at 1.1 -> -1.1.
    new, old, adv = torch.tensor([math.log(1.5)], dtype=F64), torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)
    assert ppo_clip_loss_sequence(new, old, adv, clip=0.1).item() == pytest.approx(-1.1, abs=1e-12)


def test_ppo_clip_loss_sequence_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss_sequence(x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="clip"):
        ppo_clip_loss_sequence(x, x, x, clip=1.5)


# --- PPO clip, token level ------------------------------------------------------------------------------------------


def test_ppo_clip_loss_token_hand_computed():
    nan = float("nan")
    old = torch.zeros(2, 3, dtype=F64)
    new = torch.tensor([[math.log(1.5), 0.0, nan], [math.log(0.5), nan, -math.inf]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    # Valid tokens: (ratio 1.5, A 1) -> -1.2; (ratio 1, A 1) -> -1; (ratio 0.5, A -1) -> 0.8. Mean over 3 tokens.
    loss = ppo_clip_loss_token(new, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3, abs=1e-12)
    # An integer 0/1 mask gives the same.
    assert ppo_clip_loss_token(new, old, adv, mask.long()).item() == pytest.approx(loss.item(), abs=0)


def test_ppo_clip_loss_token_matches_sequence_for_one_token():
    g = torch.Generator().manual_seed(0)
    new, old, adv = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g), torch.randn(5, generator=g)
    seq = ppo_clip_loss_sequence(new[:, 0], old[:, 0], adv)
    tok = ppo_clip_loss_token(new, old, adv, torch.ones(5, 1, dtype=torch.bool))
    torch.testing.assert_close(tok, seq)


def test_ppo_clip_loss_token_empty_mask_is_zero():
    x = torch.randn(2, 3)
    assert ppo_clip_loss_token(x, x, torch.ones(2), torch.zeros(2, 3)).item() == 0.0


def test_ppo_clip_loss_token_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss_token(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match="mask"):
        ppo_clip_loss_token(x, x, torch.zeros(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="new_logp"):
        ppo_clip_loss_token(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.zeros(6))


# --- Bradley-Terry --------------------------------------------------------------------------------------------------


def test_ppo_clip_terms_sequence_reduce_to_the_loss_bit_for_bit_whichever_way_rows_are_split():
    g = torch.Generator().manual_seed(0)
    new, old, adv = (torch.randn(12, generator=g) for _ in range(3))
    terms = ppo_clip_terms(new, old, adv, clip=0.2)
    assert terms.shape == (12, 1) and terms.dtype == torch.float32
    whole = ppo_clip_loss_sequence(new, old, adv, 0.2)
    assert reduce_ppo_terms(terms).item() == whole.item()
    parts = torch.cat([ppo_clip_terms(new[i:i + 4], old[i:i + 4], adv[i:i + 4], clip=0.2) for i in (0, 4, 8)])
    assert torch.equal(parts, terms)  # rows computed apart are the same rows


def test_ppo_clip_terms_token_hand_computed_and_reduce_to_the_token_loss():
    new = torch.tensor([[0.0, math.log(2.0), 5.0], [math.log(0.5), 0.0, 0.0]], dtype=F64)
    old = torch.zeros(2, 3, dtype=F64)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    terms = ppo_clip_terms(new, old, adv, mask, clip=0.2)
    # row 0: ratios 1 and 2 (clipped to 1.2 for A > 0): max(-1, -1) + max(-2, -1.2) = -2.2 over 2 tokens (the masked
    # 5.0 is ignored); row 1: ratio 0.5, A = -2: max(1, 2 * 0.8) = 1.6 over 1 token
    torch.testing.assert_close(terms, torch.tensor([[-2.2, 2.0], [1.6, 1.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(reduce_ppo_terms(terms), ppo_clip_loss_token(new, old, adv, mask, 0.2).float(),
                               rtol=1e-6, atol=0)
    assert reduce_ppo_terms(ppo_clip_terms(new, old, adv, torch.zeros_like(mask), clip=0.2)).item() == 0.0


def test_ppo_clip_terms_errors():
    with pytest.raises(ValueError, match="1-D"):
        ppo_clip_terms(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        ppo_clip_terms(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_terms(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip"):
        ppo_clip_terms(torch.zeros(3), torch.zeros(3), torch.zeros(3), clip=1.5)
    with pytest.raises(ValueError, match="terms"):
        reduce_ppo_terms(torch.zeros(3, 3))


def test_bradley_terry_loss_hand_computed():
    chosen = torch.tensor([2.0, 0.0], dtype=F64)
    rejected = torch.tensor([0.0, 0.0], dtype=F64)
    # -log sigmoid(2) = log(1 + e^-2); -log sigmoid(0) = log 2.
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), -F.logsigmoid(chosen - rejected).mean())


def test_bradley_terry_loss_large_margins_are_finite():
    assert bradley_terry_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() == pytest.approx(0.0, abs=1e-30)
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)


def test_bradley_terry_soft_labels_hand_computed():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64), torch.tensor([0.0, 0.0, 1.0],
                                                                                         dtype=torch.float64)
    q = torch.tensor([0.9, 0.5, 1.0], dtype=torch.float64)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (-(0.9 * math.log(s(1)) + 0.1 * math.log(s(-1))) - math.log(0.5) - math.log(s(2))) / 3
    assert bradley_terry_loss(chosen, rejected, q).item() == pytest.approx(expected, abs=1e-12)
    # q = 1 is the hard-label loss; the soft loss is smallest where sigmoid(d) = q
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, torch.ones(3, dtype=torch.float64)),
                               bradley_terry_loss(chosen, rejected))
    d = torch.linspace(-4, 4, 8001, dtype=torch.float64)
    losses = torch.stack([bradley_terry_loss(x.view(1), torch.zeros(1, dtype=torch.float64),
                                             torch.tensor([0.8], dtype=torch.float64)) for x in d])
    assert d[losses.argmin()].item() == pytest.approx(math.log(0.8 / 0.2), abs=1e-3)
    with pytest.raises(ValueError, match="target must hold probabilities"):
        bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 1.5, 0.0]))
    with pytest.raises(ValueError, match="target"):
        bradley_terry_loss(chosen, rejected, torch.ones(2))


def test_bradley_terry_loss_errors():
    with pytest.raises(ValueError, match="rejected_scores"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


# --- Masked log-prob sums -------------------------------------------------------------------------------------------


def test_masked_mean_hand_computed_ignores_masked_nan_and_is_zero_when_empty():
    from zopro.train.losses import masked_mean

    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert masked_mean(x, mask).item() == 3.0  # (1 + 2 + 6) / 3
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
