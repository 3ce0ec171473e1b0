"""GRPO loss pieces against hand-computed numbers (worked out in the comments) and a float64 naive loop."""

import math

import pytest
import torch

from latentforge.rl.losses import (
    PolicyLossConfig,
    aggregate,
    group_advantages,
    kl_penalty,
    per_token_policy_loss,
    truncated_importance_weights,
)

LN = math.log


def test_group_advantages_by_hand():
    # rewards [1, 0, 0, 1]: mean 0.5; unbiased std sqrt(4 * 0.25 / 3) = 0.57735; A = +-0.5 / 0.57735 = +-0.866025
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: no signal, no NaN
    # Dr.GRPO: no std division
    assert torch.allclose(group_advantages(rewards, normalize_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)])  # log(pi/ref) = ln 2
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * 0.693147**2, abs=1e-6)
    # k3 = ref/pi - log(ref/pi) - 1 = 0.5 + 0.693147 - 1
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_penalty(ref, ref, "k3").item() == 0.0


def _example():
    """Two sequences of 3 tokens; clip [0.8, 1.28]; tis cap 2.

    seq A (advantage +1): logp - old = [0, ln 1.5, ln 0.5]; old - behaviour = [0, 0, ln 3]
      t0: r=1, w=1            -> -(1 * 1)            = -1
      t1: r=1.5 -> clip 1.28  -> -(min(1.5,1.28) * 1) = -1.28   (clipped: no gradient)
      t2: r=0.5, w=min(3,2)=2 -> -2 * min(0.5, 0.8)   = -1.0
    seq B (advantage -1): logp - old = [ln 1.5, ln 0.5, 0]; old - behaviour = [ln 0.5, 0, 0]; t2 masked
      t0: r=1.5, w=0.5        -> -0.5 * min(-1.5, -1.28) = 0.75
      t1: r=0.5 -> clip 0.8   -> -(min(-0.5, -0.8))      = 0.8     (clipped)
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -2.0]], dtype=torch.float64)
    logp = old + torch.tensor([[0.0, LN(1.5), LN(0.5)], [LN(1.5), LN(0.5), 0.0]], dtype=torch.float64)
    behaviour = old - torch.tensor([[0.0, 0.0, LN(3.0)], [LN(0.5), 0.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    return logp.requires_grad_(True), old, behaviour, adv, mask


def test_policy_loss_hand_computed():
    logp, old, behaviour, adv, mask = _example()
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, tis_cap=2.0)
    per_token, stats = per_token_policy_loss(logp, old, behaviour, adv, mask, cfg)
    expected = torch.tensor([[-1.0, -1.28, -1.0], [0.75, 0.8, 0.0]], dtype=torch.float64)
    assert torch.allclose(per_token, expected, atol=1e-12)
    assert stats["tokens"].item() == 5
    assert stats["ppo_clipped"].item() == 2  # A.t1 and B.t1
    assert stats["tis_truncated"].item() == 1  # A.t2 (weight 3 > cap 2)

    # token: -1.73 / 5; sequence: mean(-3.28 / 3, 1.55 / 2); constant (max 4 tokens): -1.73 / (2 * 4)
    token = aggregate(per_token, mask, "token", num_tokens=5, num_sequences=2)
    assert token.item() == pytest.approx(-0.346, abs=1e-12)
    seq = aggregate(per_token, mask, "sequence", num_tokens=5, num_sequences=2)
    assert seq.item() == pytest.approx((-3.28 / 3 + 1.55 / 2) / 2, abs=1e-12)
    const = aggregate(per_token, mask, "constant", num_tokens=5, num_sequences=2, max_tokens=4)
    assert const.item() == pytest.approx(-0.21625, abs=1e-12)

    # gradient: d/dlogp of -w r A is -w r A for unclipped tokens, 0 for clipped and masked ones; / 5 tokens
    token.backward()
    expected_grad = torch.tensor([[-1.0, 0.0, -1.0], [0.75, 0.0, 0.0]], dtype=torch.float64) / 5
    assert torch.allclose(logp.grad, expected_grad, atol=1e-12)


def test_kl_term_adds_to_loss():
    logp, old, behaviour, adv, mask = _example()
    ref = logp.detach() - LN(2.0)  # log(pi/ref) = ln 2 everywhere: k3 = 0.193147 per token
    base, _ = per_token_policy_loss(logp, old, behaviour, adv, mask, PolicyLossConfig())
    with_kl, stats = per_token_policy_loss(logp, old, behaviour, adv, mask, PolicyLossConfig(kl_coef=0.1), ref)
    assert torch.allclose(with_kl - base, 0.1 * 0.193147 * mask, atol=1e-6)
    assert stats["kl_sum"].item() == pytest.approx(5 * 0.193147, abs=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        per_token_policy_loss(logp, old, behaviour, adv, mask, PolicyLossConfig(kl_coef=0.1))


def test_on_policy_gradient_is_vanilla_policy_gradient():
    # old == logp.detach() and behaviour == old: the loss gradient is -A / N per token (REINFORCE with baseline)
    torch.manual_seed(0)
    logp = torch.randn(3, 5, dtype=torch.float64).requires_grad_(True)
    adv = torch.randn(3, 1, dtype=torch.float64).expand(3, 5)
    mask = (torch.rand(3, 5) > 0.3).double()
    per_token, _ = per_token_policy_loss(logp, logp.detach(), logp.detach(), adv, mask, PolicyLossConfig())
    aggregate(per_token, mask, "token", num_tokens=mask.sum().item(), num_sequences=3).backward()
    assert torch.allclose(logp.grad, -adv * mask / mask.sum())


def test_matches_naive_loop_random():
    torch.manual_seed(1)
    b, s = 4, 7
    old = -torch.rand(b, s, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(b, s, dtype=torch.float64)).requires_grad_(True)
    behaviour = old + 0.8 * torch.randn(b, s, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(b, s, dtype=torch.float64)
    adv = torch.randn(b, 1, dtype=torch.float64).expand(b, s)
    mask = (torch.rand(b, s) > 0.2).double()
    cfg = PolicyLossConfig(
        clip_low=0.1, clip_high=0.3, tis_cap=1.5, kl_coef=0.05, kl_estimator="k3", aggregation="sequence"
    )
    per_token, _ = per_token_policy_loss(logp, old, behaviour, adv, mask, cfg, ref)
    got = aggregate(per_token, mask, "sequence", num_tokens=mask.sum().item(), num_sequences=b)

    total = 0.0
    for i in range(b):
        terms = []
        for t in range(s):
            if not mask[i, t]:
                continue
            r = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            w = min(math.exp(old[i, t].item() - behaviour[i, t].item()), 1.5)
            surrogate = min(r * a, min(max(r, 0.9), 1.3) * a)
            x = ref[i, t].item() - logp[i, t].item()
            terms.append(-w * surrogate + 0.05 * (math.exp(x) - x - 1))
        total += sum(terms) / max(len(terms), 1)
    assert got.item() == pytest.approx(total / b, abs=1e-12)


def test_truncated_weights_and_validation():
    w = truncated_importance_weights(torch.tensor([0.0, 0.0]), torch.tensor([LN(0.1), LN(2.0)]), cap=2.0)
    assert torch.allclose(w, torch.tensor([2.0, 0.5]))
    with pytest.raises(ValueError, match="clip_low"):
        PolicyLossConfig(clip_low=1.5)
    with pytest.raises(ValueError, match="aggregation"):
        PolicyLossConfig(aggregation="mean")
