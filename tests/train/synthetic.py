"""A small deterministic loader for trainer tests: the data-loader protocol without the data package.

Sample i of the global stream is a function of (seed, i) only; rank r of dp_size takes its slice of each micro-step
(the same position bookkeeping as data.loader.BatchLoader). Rows follow a learnable rule (next = (a * cur + b) mod
V, a and b per row), so the loss falls quickly.
"""

import torch


class SyntheticLoader:
    def __init__(
        self, vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0
    ):
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.consumed_samples = 0

    def sample(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        a, b, start = (int(x) for x in torch.randint(1, 17, (3,), generator=g))
        tokens = [start]
        for _ in range(self.seq_len):
            tokens.append((a * tokens[-1] + b) % self.vocab_size)
        tokens = torch.tensor(tokens)
        return tokens[:-1], tokens[1:].clone()

    def __iter__(self):
        return self

    def __next__(self):
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        rows = [self.sample(i) for i in range(start, start + self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return {
            "input_ids": torch.stack([r[0] for r in rows]),
            "labels": torch.stack([r[1] for r in rows]),
            "seq_idx": torch.zeros(len(rows), self.seq_len, dtype=torch.int32),
        }

    def state_dict(self):
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state):
        self.consumed_samples = int(state["consumed_samples"])
