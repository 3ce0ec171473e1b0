"""What the sbatch scripts ask Slurm, in Python: when to send the trainer its SIGTERM warning.

    python -m latentforge.launch.slurm term-delay   # seconds from now until the warning; nothing when unlimited

The warning comes a share of the job's time limit before its end (10 %, between 30 s and 10 min, at most half the
limit), so a 10-minute test job is warned a minute ahead and a 24-hour job ten minutes ahead; a fixed
`--signal=TERM@600` fires at once in any job of 10 minutes or less. $LATENTFORGE_TERM_BEFORE_S sets it instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

from latentforge.model.errors import UserError

UNLIMITED = ("UNLIMITED", "INFINITE", "NOT_SET", "INVALID", "N/A", "")


def parse_slurm_duration(text: str) -> Optional[float]:
    """Slurm's time format ("days-hours:minutes:seconds", "hours:minutes:seconds", "minutes:seconds", "minutes")
    -> seconds; None for an unlimited job."""
    text = text.strip()
    if text.upper() in UNLIMITED:
        return None
    days, _, clock = text.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if len(parts) == 1:
        seconds = parts[0] * 60  # a bare number is minutes
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]
    elif len(parts) == 3:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    else:
        raise ValueError(f"not a Slurm duration: {text!r}")
    return seconds + (float(days) * 86400 if days else 0.0)


def term_warning_s(limit_s: float) -> float:
    """How long before the time limit the trainer is warned (to save a checkpoint and exit)."""
    return min(max(0.1 * limit_s, 30.0), 600.0, 0.5 * limit_s)


def term_delay_s(
    limit_s: Optional[float], left_s: Optional[float], before_s: Optional[float] = None
) -> Optional[float]:
    if limit_s is None or left_s is None:
        return None
    warning = term_warning_s(limit_s) if before_s is None else before_s
    return max(0.0, left_s - warning)


def job_times(job_id: str) -> tuple:
    """(time limit, time left) in seconds of a running job, from squeue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%l|%L"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or "|" not in out.stdout:
        raise UserError(f"squeue -j {job_id} gave no time limit ({out.stderr.strip() or out.stdout.strip()!r})")
    limit, left = out.stdout.strip().splitlines()[0].split("|")
    return parse_slurm_duration(limit), parse_slurm_duration(left)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args != ["term-delay"]:
        print("usage: python -m latentforge.launch.slurm term-delay", file=sys.stderr)
        return 2
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        print("latentforge.launch.slurm: $SLURM_JOB_ID is not set: run inside a Slurm job", file=sys.stderr)
        return 2
    before = os.environ.get("LATENTFORGE_TERM_BEFORE_S")
    delay = term_delay_s(*job_times(job_id), before_s=float(before) if before else None)
    if delay is not None:
        print(int(delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
