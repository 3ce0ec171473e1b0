"""MTP drafting: the shared MTP block proposes k tokens per row, each depth with its own KV cache.

Depth j at position s reads the token at s+j and the depth-(j-1) hidden state at s (the trunk's final-normed
hidden at depth 1) and predicts the token at s+j+1, exactly as in training (SPEC section 3); depths beyond the
trained ones reuse the same block. With a row whose main model has consumed P tokens and whose next token x_P is
already chosen, depth j at position P-1 drafts token P+j, reading x_{P-1+j}: the real x_P at depth 1, the
depth-(j-1) draft after that.

Each depth keeps a KV cache of its own stream. An entry at position s is final once its inputs are: the token at
s+j is known (s + j <= P) and so is the depth-(j-1) hidden at s. So after a catch-up at P, depth j holds final
entries for positions < P-j+1, and the next catch-up (at P' > P) reruns depth j over [P-j+1, P'-1]: what the
main model accepted since, plus the j-1 positions that had used drafts. Depth j-1 reruns from P-j+2, one position
later, so the one hidden it lacks, h_{j-1}(P-j+1), is kept from the previous catch-up (it was final then).
Per verify step that is j + (accepted drafts) positions at depth j, and k sequential MTP calls. Entries beyond a
row's final length (rejected or padded positions) are masked by position and overwritten, so a rejection leaves
no stale state behind.
"""

from __future__ import annotations

import torch

from .runner import ModelRunner
from .transfer import to_device


class MTPDrafter:
    def __init__(self, runner: ModelRunner, depths: int, num_slots: int):
        model = runner.model
        if model.mtp is None:
            raise ValueError(
                "draft_tokens > 0 needs a model with an MTP block (model.mtp_depths > 0); "
                "set draft_tokens=0 for plain decoding"
            )
        self.runner = runner
        self.depths = depths
        hidden = model.cfg.hidden_size
        weight = model.lm_head.weight
        self.processed = [0] * num_slots  # P at the last catch-up, per slot
        # h_j(P - j) for j = 1..k-1: what depth j+1 needs at its first position next time
        self.carry = torch.zeros(num_slots, max(depths - 1, 1), hidden, dtype=weight.dtype, device=weight.device)
        self.drafts = torch.zeros(num_slots, depths, dtype=torch.long, device=weight.device)
        self.draft_probs = None  # (slots, k, V), allocated on first use (its dtype is the sampler's)
        self.has_probs = [False] * num_slots

    def move_row(self, src: int, dst: int):
        self.processed[dst] = self.processed[src]
        self.carry[dst] = self.carry[src]
        self.drafts[dst] = self.drafts[src]
        self.has_probs[dst] = self.has_probs[src]
        if self.draft_probs is not None:
            self.draft_probs[dst] = self.draft_probs[src]

    def reset_row(self, row: int):
        self.processed[row] = 0

    def cache_lengths(self, row: int) -> list:
        """Final entries of each depth's KV cache for the row (what compaction must copy)."""
        p = self.processed[row]
        return [max(0, p - j + 1) for j in range(1, self.depths + 1)]

    @torch.no_grad()
    def catch_up(self, lo: int, sequences: list, new_processed: list, trunk_hidden: torch.Tensor, sampler):
        """Advance the depth caches of slot rows lo..lo+m-1 and draft k tokens for each.

        sequences[i]: row i's token ids, at least through position new_processed[i] (its next, chosen token).
        trunk_hidden (m, c, H): the trunk's hidden at positions processed[i] .. new_processed[i]-1 (right-padded).
        sampler(logits (m, V), depth) -> (tokens (m,), probs (m, V) or None when every row is greedy).
        """
        m = len(sequences)
        rows = slice(lo, lo + m)
        device = trunk_hidden.device
        plan = self._plan(self.processed[lo : lo + m], new_processed, sequences, device)
        drafted = torch.zeros(m, self.depths, dtype=torch.long, device=device)
        probs: list[torch.Tensor | None] = []
        carry_out = {}
        previous: torch.Tensor | None = None  # depth j-1 hidden over its run [first[j-1], new-1]
        for depth, (known, draft_column, start, last, shift, keep, max_start) in enumerate(plan, start=1):
            # drafted tokens stay on the device: a column >= 0 takes this catch-up's draft of that depth
            tokens = torch.where(draft_column >= 0, drafted.gather(1, draft_column.clamp(min=0)), known)
            width = tokens.shape[1]
            if previous is None:  # depth 1 reads the trunk
                prev_hidden = trunk_hidden[:, :width]
            else:
                padded = torch.cat([self.carry[rows, depth - 2].unsqueeze(1), previous], dim=1)
                index = torch.arange(width, device=device)[None, :] + 1 - shift[:, None]
                index = index.clamp_(max=padded.shape[1] - 1)
                prev_hidden = padded.gather(1, index[:, :, None].expand(-1, -1, padded.shape[-1]))
            hidden, logits = self.runner.mtp_depth(depth, rows, tokens, prev_hidden, start, max_start, last)
            chosen, chosen_probs = sampler(logits, depth)
            drafted[:, depth - 1] = chosen
            probs.append(chosen_probs)
            if depth < self.depths:
                # keep h_depth(new - depth) for depth+1's next catch-up (final wherever new - depth >= 0)
                carry_out[depth] = hidden[torch.arange(m, device=device), keep]
            previous = hidden
        for depth, value in carry_out.items():
            self.carry[rows, depth - 1] = value
        self.processed[lo : lo + m] = list(new_processed)
        self.drafts[rows] = drafted
        distributions = [p for p in probs if p is not None]
        if len(distributions) < len(probs):  # greedy rows: q is the one-hot of the draft, built when needed
            self.has_probs[lo : lo + m] = [False] * m
            return
        stacked = torch.stack(distributions, dim=1)
        if self.draft_probs is None or self.draft_probs.dtype != stacked.dtype:
            self.draft_probs = torch.zeros(
                len(self.processed), self.depths, stacked.shape[-1], dtype=stacked.dtype, device=device
            )
        self.draft_probs[rows] = stacked
        self.has_probs[lo : lo + m] = [True] * m

    def _plan(self, old: list, new: list, sequences: list, device: torch.device) -> list:
        """Per depth, what its MTP call reads, built on the host from lengths alone and sent in one copy:
        (known tokens (m, c), draft column (m, c): -1 where the token is known, else the depth whose draft of
        this catch-up goes there, start (m,), last (m,), shift (m,), keep (m,), the largest start)."""
        m = len(old)
        flat: list = []
        shapes = []
        previous_first: list = []
        for depth in range(1, self.depths + 1):
            first = [max(0, p - depth + 1) for p in old]
            counts = [n - f for n, f in zip(new, first)]
            width = max(counts)
            known, column = [], []
            for i in range(m):
                # position s reads token s+depth: known through new[i], this catch-up's drafts after it
                head, p_new = first[i] + depth, new[i]
                tokens = [sequences[i][q] if q <= p_new else 0 for q in range(head, head + counts[i])]
                columns = [-1 if q <= p_new else q - p_new - 1 for q in range(head, head + counts[i])]
                known += tokens + [0] * (width - counts[i])
                column += columns + [-1] * (width - counts[i])
            # the shift against depth-1's run (1: prepend the carried hidden), the column of h_depth(new - depth)
            shift = [pf - f for pf, f in zip(previous_first, first)] if depth > 1 else [0] * m
            keep = [max(0, n - depth - f) for n, f in zip(new, first)]
            flat += known + column + first + [c - 1 for c in counts] + shift + keep
            shapes.append((width, max(first)))
            previous_first = first
        values = to_device(flat, device)
        plan, offset = [], 0
        for width, max_start in shapes:
            known, column = values[offset : offset + 2 * m * width].view(2, m, width)
            offset += 2 * m * width
            start, last, shift, keep = values[offset : offset + 4 * m].view(4, m)
            offset += 4 * m
            plan.append((known, column, start, last, shift, keep, max_start))
        return plan

    def draft_distributions(self, n: int, vocab: int, dtype) -> torch.Tensor:
        """q (n, k, V) of rows 0..n-1: the stored distributions, one-hot drafts for rows drafted greedily."""
        one_hot = torch.zeros(n, self.depths, vocab, dtype=dtype, device=self.drafts.device)
        one_hot.scatter_(-1, self.drafts[:n, :, None], 1.0)
        if self.draft_probs is None or not any(self.has_probs[:n]):
            return one_hot
        stored = torch.tensor(self.has_probs[:n], device=self.drafts.device)[:, None, None]
        return torch.where(stored, self.draft_probs[:n].to(dtype), one_hot)
