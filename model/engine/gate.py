"""Speculation that gates itself: draft only while drafting is measured to pay on this hardware.

The engine times each decode step (plain: one token per row) and each speculative step (MTP drafts + verify: the
accepted drafts + 1 per row), and tracks the accepted length. The expected speedup of drafting is

    accepted length x (seconds of a plain step) / (seconds of a draft step)

(per-step times at the batch sizes just seen). Drafting stays on while that is at least 1 - margin and comes back
when it is at least 1 + margin (hysteresis against flapping). The mode not in use is probed for `probe_steps`
steps every `probe_interval` steps, so a changed accepted length (new weights, other prompts) or a changed cost
(batch size, another device) is noticed both ways. Greedy output is the same in either mode; only the speed changes.
"""

from __future__ import annotations

import time
from typing import Callable, Optional


class DraftGate:
    def __init__(
        self,
        probe_interval: int = 64,
        probe_steps: int = 4,
        margin: float = 0.05,
        smoothing: float = 0.3,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if probe_interval < 1 or probe_steps < 2:
            raise ValueError(
                f"DraftGate: probe_interval must be >= 1 and probe_steps >= 2 (the first step of a "
                f"probe is a warm-up), got {probe_interval} and {probe_steps}"
            )
        self.probe_interval = probe_interval
        self.probe_steps = probe_steps
        self.margin = margin
        self.smoothing = smoothing
        self.clock = clock
        self.on = True  # the preferred mode
        self.plain_s: Optional[float] = None  # EMA seconds of a plain step
        self.draft_s: Optional[float] = None  # EMA seconds of a draft (verify + catch-up) step
        self.accepted: Optional[float] = None  # EMA tokens per row per draft step
        self._probe_left = 0  # steps of the running probe still to go (the other mode than `on`)
        self._in_mode = 0  # steps since the last probe ended (or since the start)
        self._mode_steps = 0  # consecutive steps in the current mode (the first of a run is not measured)
        self._last_mode: Optional[bool] = None

    # ----- decisions ------------------------------------------------------------------------------------------
    def choose(self) -> bool:
        """True: draft this step; False: plain decoding."""
        if self._probe_left > 0:
            return not self.on
        missing = self.plain_s is None if self.on else self.draft_s is None
        if self._in_mode >= (self.probe_steps if missing else self.probe_interval):
            self._probe_left = self.probe_steps
            return not self.on
        return self.on

    def record(self, drafted: bool, seconds: float, rows: int, tokens: int) -> None:
        """One step's time; `tokens`: what the rows produced (drafts accepted + 1 each, or 1 each)."""
        self._mode_steps = self._mode_steps + 1 if drafted == self._last_mode else 1
        self._last_mode = drafted
        if self._mode_steps > 1:  # a mode's first step after a switch pays warm-up / catch-up costs
            if drafted:
                self.draft_s = self._ema(self.draft_s, seconds)
                self.accepted = self._ema(self.accepted, tokens / max(rows, 1))
            else:
                self.plain_s = self._ema(self.plain_s, seconds)
        if self._probe_left > 0 and drafted != self.on:
            self._probe_left -= 1
            if self._probe_left == 0:
                self._decide()
                self._in_mode = 0
        else:
            self._in_mode += 1

    def expected_speedup(self) -> Optional[float]:
        if self.plain_s is None or self.draft_s is None or self.accepted is None or self.draft_s <= 0:
            return None
        return self.accepted * self.plain_s / self.draft_s

    # ----- internals ------------------------------------------------------------------------------------------
    def _decide(self) -> None:
        speedup = self.expected_speedup()
        if speedup is None:
            return
        self.on = speedup >= (1 - self.margin if self.on else 1 + self.margin)

    def _ema(self, old: Optional[float], new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new
