"""The engine's sampling pieces against independent formulations: per-row temperature / top-k / top-p against a
loop over sorted tokens, inverse-CDF sampling and the speculative-sampling rule against their exact distributions
(chi-square over many draws), the greedy rule against the general one."""

import math

import pytest
import torch

from latentforge.model.engine.sampling import greedy_accept, sample, sampling_probs, speculative_accept


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny ops: intra-op threads only add synchronisation (ms per op on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's test; cells with expected count < 5 are pooled into one."""
    total = counts.sum().item()
    expected = expected_probs.double() * total
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    if exp[-1] < 5:  # pooled cell still tiny: merge it into the last kept cell
        obs = torch.cat([obs[:-2], (obs[-2] + obs[-1]).view(1)])
        exp = torch.cat([exp[:-2], (exp[-2] + exp[-1]).view(1)])
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def naive_probs(logits, temperature, top_k, top_p):
    """One row: sort, cut to top-k, then keep tokens while the mass above them is < top_p."""
    vocab = logits.numel()
    if temperature == 0:
        out = torch.zeros(vocab, dtype=torch.float64)
        out[int(torch.argmax(logits))] = 1.0
        return out
    scaled = logits.double() / temperature
    order = sorted(range(vocab), key=lambda i: -scaled[i].item())
    kept = order[:top_k] if top_k else order
    weights = torch.tensor([math.exp(scaled[i].item() - scaled[kept[0]].item()) for i in kept], dtype=torch.float64)
    weights /= weights.sum()
    final, mass = [], 0.0
    for token, w in zip(kept, weights.tolist()):
        if mass >= top_p:
            break
        final.append(token)
        mass += w
    out = torch.zeros(vocab, dtype=torch.float64)
    values = torch.tensor([math.exp(scaled[i].item()) for i in final], dtype=torch.float64)
    out[final] = values / values.sum()
    return out


def test_sampling_probs_against_a_loop():
    torch.manual_seed(0)
    settings = [
        (1.0, 0, 1.0),
        (0.7, 5, 1.0),
        (1.3, 0, 0.8),
        (0.5, 8, 0.6),
        (0.0, 0, 1.0),
        (2.0, 1, 1.0),
        (1.0, 0, 0.05),
        (0.9, 30, 0.999),
    ]
    logits = torch.randn(len(settings), 30, dtype=torch.float64) * 2
    temperature = torch.tensor([s[0] for s in settings], dtype=torch.float64)
    top_k = torch.tensor([s[1] for s in settings])
    top_p = torch.tensor([s[2] for s in settings], dtype=torch.float64)
    got = sampling_probs(logits, temperature, top_k, top_p)
    for row, (t, k, p) in enumerate(settings):
        torch.testing.assert_close(got[row], naive_probs(logits[row], t, k, p), rtol=1e-12, atol=1e-12)
    # the engine passes `cut` from the requests instead of reading it from the device: the same distributions
    torch.testing.assert_close(sampling_probs(logits, temperature, top_k, top_p, cut=True), got, rtol=0, atol=0)
    uncut = [0, 4]  # rows without top-k / top-p
    torch.testing.assert_close(
        sampling_probs(logits[uncut], temperature[uncut], top_k[uncut], top_p[uncut], cut=False), got[uncut]
    )
    sampled = [0, 1, 2, 3]  # rows with a temperature > 0: the same without the greedy one-hot
    torch.testing.assert_close(
        sampling_probs(logits[sampled], temperature[sampled], top_k[sampled], top_p[sampled], any_greedy=False),
        got[sampled],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(sampling_probs(logits, temperature, top_k, top_p, any_greedy=True), got, rtol=0, atol=0)


def test_sample_follows_the_distribution_and_skips_zero_mass():
    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    n = 60_000
    tokens = sample(probs.expand(n, -1), torch.rand(n, dtype=torch.float64))
    counts = torch.bincount(tokens, minlength=6)
    assert counts[probs == 0].sum() == 0
    assert chi_square_p_value(counts[probs > 0], probs[probs > 0]) > 1e-3
    edge = sample(probs.expand(2, -1), torch.tensor([0.0, 1.0 - 1e-16], dtype=torch.float64))
    assert edge.tolist() == [1, 4]


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_rule_preserves_the_target_distribution(k):
    """Target p_j fixed per position (independent of the prefix) and drafts drawn from q_j independently: each
    emitted token must follow p_j, conditionally on reaching it, and depth 1 must accept with sum min(p, q)."""
    torch.manual_seed(1)
    vocab, n = 6, 200_000
    p = torch.softmax(torch.randn(k + 1, vocab, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab, dtype=torch.float64) * 1.5, -1)
    q[:, 0] = 0.0  # a token the drafter never proposes but the target likes
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.stack([sample(q[j].expand(n, -1), torch.rand(n, dtype=torch.float64)) for j in range(k)], 1)
    accepted, nxt = speculative_accept(
        p.expand(n, -1, -1),
        q.expand(n, -1, -1),
        drafts,
        torch.rand(n, k, dtype=torch.float64),
        torch.rand(n, dtype=torch.float64),
    )
    emitted = torch.cat([drafts, nxt[:, None]], 1)
    emitted[torch.arange(n), accepted] = nxt
    expected_accept = torch.minimum(p[0], q[0]).sum().item()
    assert abs((accepted >= 1).double().mean().item() - expected_accept) < 4 * math.sqrt(0.25 / n)
    for j in range(k + 1):
        reached = accepted >= j  # token j is emitted iff drafts 1..j were accepted
        counts = torch.bincount(emitted[reached, j], minlength=vocab)
        assert chi_square_p_value(counts, p[j]) > 1e-4, f"position {j}"


def test_speculative_rule_is_not_vacuous():
    """The same check catches a wrong residual (sampling the correction from p instead of max(0, p - q))."""
    torch.manual_seed(1)
    vocab, n = 6, 100_000
    p = torch.softmax(torch.randn(2, vocab, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(torch.randn(1, vocab, dtype=torch.float64) * 1.5, -1)
    drafts = sample(q[0].expand(n, -1), torch.rand(n, dtype=torch.float64))[:, None]
    accept = torch.rand(n, dtype=torch.float64) * q[0][drafts[:, 0]] < p[0][drafts[:, 0]]
    wrong = torch.where(accept, drafts[:, 0], sample(p[0].expand(n, -1), torch.rand(n, dtype=torch.float64)))
    assert chi_square_p_value(torch.bincount(wrong, minlength=vocab), p[0]) < 1e-6


def test_greedy_rule_equals_general_rule_with_one_hot_distributions():
    torch.manual_seed(2)
    n, k, vocab = 400, 3, 5
    logits = torch.randn(n, k + 1, vocab, dtype=torch.float64)
    best = logits.argmax(-1)
    # drafts: right with probability 0.7 at each depth, so every acceptance length occurs
    drafts = torch.where(torch.rand(n, k) < 0.7, best[:, :k], torch.randint(0, vocab, (n, k)))
    accepted, nxt = greedy_accept(logits, drafts)
    one_hot_p = torch.nn.functional.one_hot(best, vocab).double()
    one_hot_q = torch.nn.functional.one_hot(drafts, vocab).double()
    acc2, nxt2 = speculative_accept(
        one_hot_p, one_hot_q, drafts, torch.rand(n, k, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    )
    assert torch.equal(accepted, acc2) and torch.equal(nxt, nxt2)
    assert set(accepted.tolist()) == set(range(k + 1))
    for row in range(n):  # and against the definition
        a = 0
        while a < k and drafts[row, a] == best[row, a]:
            a += 1
        assert accepted[row] == a and nxt[row] == best[row, a]
