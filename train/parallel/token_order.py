"""Which tokens of a sequence each context-parallel rank holds.

Causal attention costs a query in proportion to its position, so cutting the sequence into `cp` contiguous pieces
leaves the last rank with 2cp-1 times the work of the first. The load-balanced order (Megatron's and TorchTitan's
"zigzag" / head-tail chunks) cuts it into 2cp chunks and gives rank r chunks r and 2cp-1-r: every rank then holds
the same number of (query, key) pairs. A rank's local tokens are its chunks concatenated, in global order.

Nothing is permuted back between layers: token-wise layers (MLP, MoE, norms, heads) do not care about the order,
attention masks by global position, and Mamba treats each chunk as a contiguous segment of the sequence whose
incoming state and conv history come from the chunk before it (whichever rank holds it); see context_parallel.py.

The load-balanced order needs a sequence length divisible by 2cp with chunks of at least conv_kernel - 1 tokens
(the conv history comes from the previous chunk only); otherwise the plain contiguous order is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TokenOrder:
    seq_len: int
    cp: int
    load_balanced: bool

    @classmethod
    def choose(cls, seq_len: int, cp: int, load_balance: bool, min_chunk: int = 1) -> "TokenOrder":
        """The load-balanced order when asked for and possible, else contiguous."""
        possible = cp > 1 and seq_len % (2 * cp) == 0 and seq_len // (2 * cp) >= max(min_chunk, 1)
        return cls(seq_len, cp, bool(load_balance and possible))

    @property
    def num_chunks(self) -> int:
        return 2 * self.cp if self.load_balanced else self.cp

    @property
    def chunk_len(self) -> int:
        return self.seq_len // self.num_chunks

    def chunks_of(self, rank: int) -> list[int]:
        """The global chunk indices rank `rank` holds, in its local order (= global order)."""
        if self.load_balanced:
            return [rank, 2 * self.cp - 1 - rank]
        return [rank]

    def owner(self, chunk: int) -> tuple[int, int]:
        """(rank, segment index within that rank) of global chunk `chunk`."""
        if not self.load_balanced or chunk < self.cp:
            return chunk, 0
        return 2 * self.cp - 1 - chunk, 1

    def positions(self, rank: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """(seq_len / cp,) global positions of rank `rank`'s tokens, in its local order."""
        n = self.chunk_len
        return torch.cat([torch.arange(c * n, (c + 1) * n, device=device) for c in self.chunks_of(rank)])

    def all_positions(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """(seq_len,) global positions of every rank's tokens concatenated in rank order (an all-gather's order)."""
        return torch.cat([self.positions(r, device) for r in range(self.cp)])
