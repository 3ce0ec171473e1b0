"""Sampling distributions, inverse-CDF sampling from given uniforms, and the speculative-sampling acceptance rule.

Every request samples from its *sampling distribution*: the logits divided by the temperature, cut to the top-k
tokens and then to the smallest top-p nucleus, renormalised. Temperature 0 is greedy: the distribution is one-hot
on the argmax (first index on ties). Randomness enters only as uniforms in [0, 1) drawn from each request's own
generator, so a request's samples do not depend on the other rows of the batch.

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft d_j was drawn from q_j; the target gives p_j.
Accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from
normalise(max(0, p_j - q_j)); if every draft is accepted draw a bonus token from the next target distribution.
Each emitted token is then distributed exactly as p, whatever q is. With one-hot (greedy) p and q the rule
reduces to "accept while the draft equals the argmax, then emit the argmax", i.e. exactly greedy decoding.
"""

from __future__ import annotations

from typing import Optional

import torch


def sampling_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    cut: Optional[bool] = None,
    any_greedy: Optional[bool] = None,
) -> torch.Tensor:
    """logits (n, V); per-row temperature (n,) (0 = greedy), top_k (n,) long (0 = off), top_p (n,) (1 = off).
    cut / any_greedy: whether any row has a top-k / top-p cut / is greedy; the engine knows both from the requests
    (None: read from the tensors, which waits for the device).

    Returns probabilities (n, V) in fp32 (fp64 for fp64 logits)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    n, vocab = logits.shape
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).to(dtype)[:, None]
    if cut is None:
        cut = bool(((top_k > 0) & (top_k < vocab)).any()) or bool((top_p < 1).any())
    if cut:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))[:, None]
        sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        # keep a token while the tokens ranked above it hold less than top_p (the first token always stays)
        sorted_logits = sorted_logits.masked_fill(before >= top_p.to(dtype)[:, None], float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    if any_greedy is None:
        any_greedy = bool(greedy.any())
    if not any_greedy:  # the usual sampled batch: no (n, V) one-hot to build
        return probs
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: probs (n, V), uniforms (n,) in [0, 1) -> tokens (n,) long; never picks a zero-probability
    token (the first token whose cumulative mass exceeds u * total)."""
    cdf = probs.to(torch.float64).cumsum(-1)
    target = (uniforms.to(torch.float64) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


def speculative_accept(
    target: torch.Tensor,
    draft_probs: torch.Tensor,
    drafts: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
):
    """The acceptance rule over k drafts per row.

    target (n, k+1, V): p at the k+1 verified positions (position j predicts the token after draft j, position 0
    the token the drafts start with); draft_probs (n, k, V): q of each draft; drafts (n, k) long;
    accept_uniforms (n, k); sample_uniforms (n,).
    Returns (accepted (n,) long: leading drafts accepted, next_token (n,) long: the correction or bonus token).
    """
    n, k = drafts.shape
    rows = torch.arange(n, device=drafts.device)
    p_draft = target[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_draft = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    # u < p/q, written without the division: q(d) > 0 for any draft actually drawn from q
    accept = accept_uniforms.to(p_draft.dtype) * q_draft < p_draft
    accepted = accept.long().cumprod(dim=1).sum(dim=1)
    dist = target[rows, accepted]  # the bonus distribution where everything was accepted
    # computed for every row (no host read of which rows rejected); rows that accepted all drafts keep p
    q_rejected = draft_probs[rows, accepted.clamp(max=k - 1)]
    residual = (dist - q_rejected).clamp_(min=0)
    # p == q at the rejected draft would make the residual empty; that rejection has probability 0
    usable = residual.sum(-1, keepdim=True) > 0
    residual = torch.where(usable, residual, dist)
    dist = torch.where((accepted < k)[:, None], residual, dist)
    return accepted, sample(dist, sample_uniforms)


def greedy_accept(target_logits: torch.Tensor, drafts: torch.Tensor):
    """The rule for greedy rows, without building distributions: accept while draft j equals the argmax at
    position j, then emit the argmax at the first mismatch (or the bonus position). target_logits (n, k+1, V)."""
    best = target_logits.argmax(-1)  # (n, k+1)
    k = drafts.shape[1]
    accepted = (drafts == best[:, :k]).long().cumprod(dim=1).sum(dim=1)
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def log_softmax_at(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] along the last dim; logits (..., V), tokens (...)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(dtype), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
