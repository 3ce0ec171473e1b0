"""train.seq_len_schedule: the resolver against a hand expansion, bad schedules refused when the recipe loads, the
one data order every length reads (a contiguous cover of the stream, whatever the schedule) and its saved position,
phases without CP, and `train/pretrain.py` runs alternating lengths: the logged shapes follow the schedule at a
constant token budget, a resume at and inside a phase equals the uninterrupted run bitwise, the first long step
equals a plain run at that length, and CP=2 on 2 processes (with and without a no-CP phase) equals one process."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from latentforge.data.loader import BatchLoader
from latentforge.data.mixed_length import MixedLengthLoader
from latentforge.train.callbacks.jsonl import read_jsonl
from latentforge.train.config import TrainConfig, TrainConfigError
from latentforge.train.parallel import ParallelConfig
from latentforge.train.pretrain import PretrainSetup, load_configs
from latentforge.train.seq_schedule import SeqLenSchedule, SeqLenScheduleError, StepShape, check_schedule_layout


# ----- the resolver ----------------------------------------------------------------------------------------------
def reference_shapes(phases, steps, seq_len, micro, global_batch):
    """Expand the phases by hand, step by step, into (seq_len, micro, global) at the same token budget."""
    tokens, out = seq_len * global_batch, []
    while len(out) < steps:
        for phase in phases:
            length, count = (phase, 1) if isinstance(phase, int) else (phase["seq_len"], phase["steps"])
            for _ in range(count):
                out.append(StepShape(length, max(1, micro * seq_len // length), tokens // length))
    return out[:steps]


def test_alternation_keeps_token_budget_and_matches_hand_expansion():
    phases = [{"seq_len": 1024, "steps": 1}, {"seq_len": 64, "steps": 1}]
    schedule = SeqLenSchedule(phases, seq_len=64, micro_batch_size=4, global_batch_size=32)
    got = [schedule.shape(step) for step in range(1, 9)]
    assert got == reference_shapes(phases, 8, 64, 4, 32)
    assert {shape.seq_len * shape.global_batch_size for shape in got} == {64 * 32}
    assert got[0] == StepShape(1024, 1, 2) and got[1] == StepShape(64, 4, 32)
    bare = SeqLenSchedule([1024, 64], seq_len=64, micro_batch_size=4, global_batch_size=32)
    assert [bare.shape(step) for step in range(1, 9)] == got  # a bare length is one step


def test_the_million_and_4k_alternation():
    schedule = SeqLenSchedule([1048576, 4096], seq_len=1048576, micro_batch_size=1, global_batch_size=16)
    assert schedule.shape(1) == StepShape(1048576, 1, 16) and schedule.shape(2) == StepShape(4096, 256, 4096)
    assert schedule.shape(2026).seq_len == 4096 and schedule.shape(2027).seq_len == 1048576


def test_phases_of_several_steps_cycle():
    phases = [{"seq_len": 128, "steps": 3}, {"seq_len": 512, "steps": 2}]
    schedule = SeqLenSchedule(phases, seq_len=128, micro_batch_size=2, global_batch_size=8)
    got = [schedule.shape(step).seq_len for step in range(1, 12)]
    assert got == [128, 128, 128, 512, 512, 128, 128, 128, 512, 512, 128]
    assert [s.seq_len for s in reference_shapes(phases, 11, 128, 2, 8)] == got
    assert schedule.shape(4).grad_accumulation(dp_size=1) == 2  # 2 sequences of 512 per step, one per micro-batch


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ([{"seq_len": 0, "steps": 1}], "positive integers"),
        ([{"seq_len": 64}], "must be a length or {seq_len: int, steps: int}"),
        ([{"seq_len": 64, "steps": 1, "micro": 2}], "must be a length or"),
        (["64"], "must be a length or"),
        ([{"seq_len": 96, "steps": 1}], "does not divide the step's token budget"),
        ([{"seq_len": 256, "steps": 1}], "do not split into micro-batches"),
    ],
)
def test_bad_schedules_give_one_clear_line(raw, fragment):
    with pytest.raises(SeqLenScheduleError) as error:
        SeqLenSchedule(raw, seq_len=64, micro_batch_size=2, global_batch_size=8, dp_size=4)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert "train.seq_len_schedule[0]" in str(error.value)


def test_a_bad_schedule_fails_when_the_recipe_loads():
    setup = load_configs(["recipe=tiny", "train.seq_len_schedule=[{seq_len:256,steps:2},{seq_len:64,steps:1}]"])
    assert isinstance(setup, PretrainSetup) and isinstance(setup.train, TrainConfig)
    assert setup.train.seq_len_schedule == [{"seq_len": 256, "steps": 2}, {"seq_len": 64, "steps": 1}]
    assert load_configs(["recipe=tiny"]).train.seq_len_schedule == []  # the dataclass default: one length
    with pytest.raises(TrainConfigError, match=r"train.seq_len_schedule\[1\].seq_len=96 does not divide"):
        load_configs(["recipe=tiny", "train.seq_len_schedule=[128,96]"])
    # under CP every length must split into whole Mamba chunks per rank (tiny: chunk_size 32, so cp=2 needs 64)
    with pytest.raises(TrainConfigError, match=r"\[1\].seq_len=32: with cp \(2\) each rank holds 16 tokens"):
        load_configs(["recipe=tiny", "parallel.cp=2", "train.seq_len_schedule=[256,32]"])


def test_the_load_balanced_cp_order_needs_lengths_divisible_by_2cp():
    from latentforge.model import ModelConfig

    model = ModelConfig(pattern="*", hidden_size=32, vocab_size=64, num_attention_heads=2, num_key_value_heads=1)
    schedule = SeqLenSchedule([100, 20], seq_len=100, micro_batch_size=1, global_batch_size=4)
    check_schedule_layout(schedule, model, ParallelConfig(cp=4, cp_load_balance=False))
    with pytest.raises(SeqLenScheduleError, match=r"\[0\].seq_len=100 is not divisible by 2 x parallel.cp = 8"):
        check_schedule_layout(schedule, model, ParallelConfig(cp=4))


# ----- the per-length data streams -------------------------------------------------------------------------------
class CountingTokenizer:
    def fingerprint(self) -> dict:
        return {"kind": "counting"}

    def check_matches(self, recorded: dict, what: str) -> None:
        assert recorded == self.fingerprint(), what


class PositionSource:
    """Row i of `row_len` tokens holds the stream positions i * row_len, ..., each token its own position (so the
    tokens read name where they came from); a label is the next position, documents are 3 tokens long."""

    samples_per_epoch = 3  # 24 tokens an epoch: the runs below cross epochs

    def __init__(self, row_len: int = 8):
        self.row_len = row_len

    def prepare(self, start: int, stop: int) -> None:
        pass

    def sample(self, index: int):
        ids = index * self.row_len + np.arange(self.row_len, dtype=np.int64)
        return {"input_ids": ids, "labels": ids + 1, "seq_idx": (ids // 3).astype(np.int32)}

    def identity(self) -> dict:
        return {"seq_len": self.row_len}


BUDGET = 16  # tokens per step: 2 x 8 or 8 x 2; micro-batches of 1 x 8 or 2 x 2, over 2 data-parallel ranks
STEPS_BY_LENGTH = [8, 2, 2, 8, 2, 2, 8]  # phases [{8, 1 step}, {2, 2 steps}]


def ranks_loaders():
    return [
        MixedLengthLoader(PositionSource(), CountingTokenizer(), micro_batch_sizes={8: 1, 2: 2}, dp_rank=r, dp_size=2)
        for r in (0, 1)
    ]


def read_steps(loaders, lengths):
    """Every micro-batch of every step, in global order (micro-step, then data-parallel rank), as one list."""
    batches = []
    for length in lengths:
        micro_steps = BUDGET // length // (2 * {8: 1, 2: 2}[length])
        for _ in range(micro_steps):
            batches += [next(loader.stream(length)) for loader in loaders]
    return batches


def test_every_length_reads_the_one_order_without_repeats_or_gaps():
    batches = read_steps(ranks_loaders(), STEPS_BY_LENGTH)
    tokens = np.concatenate([b["input_ids"].numpy().reshape(-1) for b in batches])
    assert tokens.tolist() == list(range(BUDGET * len(STEPS_BY_LENGTH)))  # the independent expansion: positions
    for batch in batches:
        ids = batch["input_ids"].numpy()
        assert (batch["labels"].numpy() == ids + 1).all()  # the next token, at a slice's last position too
        expected_docs = ids // 3 - (ids[:, :1] // 3)  # document ids renumbered from each slice's first token
        assert (batch["seq_idx"].numpy() == expected_docs).all()
    other_order = read_steps(ranks_loaders(), [2, 2, 2, 2, 8, 8, 8])  # another schedule reads the same tokens
    assert np.concatenate([b["input_ids"].numpy().reshape(-1) for b in other_order]).tolist() == tokens.tolist()


@pytest.mark.parametrize("stop", [1, 2, 3, 5])  # at a change of length (1, 3) and inside the 2-token phase (2, 5)
def test_a_restored_position_repeats_the_batches_bitwise(stop):
    straight = read_steps(ranks_loaders(), STEPS_BY_LENGTH)
    first = ranks_loaders()
    read_steps(first, STEPS_BY_LENGTH[:stop])
    resumed = ranks_loaders()
    for loader, saved in zip(resumed, first):
        loader.load_state_dict(saved.state_dict())
    rest = read_steps(resumed, STEPS_BY_LENGTH[stop:])
    done = len(straight) - len(rest)
    for got, expected in zip(rest, straight[done:]):
        assert all(torch.equal(got[key], expected[key]) for key in ("input_ids", "labels", "seq_idx"))


def test_positions_carry_over_when_a_schedule_is_added_or_removed():
    plain = BatchLoader(PositionSource(), CountingTokenizer(), micro_batch_size=2, dp_rank=0, dp_size=1)
    next(plain)  # 2 rows of the longest length: 16 tokens
    scheduled = MixedLengthLoader(PositionSource(), CountingTokenizer(), micro_batch_sizes={8: 2, 2: 8})
    scheduled.load_state_dict(plain.state_dict())
    assert next(scheduled.stream(2))["input_ids"][0].tolist() == [16, 17]
    back = BatchLoader(PositionSource(), CountingTokenizer(), micro_batch_size=2, dp_rank=0, dp_size=1)
    back.load_state_dict(scheduled.state_dict())  # 16 + 8 x 2 tokens read: 4 rows of 8
    assert next(back)["input_ids"][:, 0].tolist() == [32, 40]
    other = BatchLoader(PositionSource(4), CountingTokenizer(), micro_batch_size=2, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="longest length or data differ"):
        other.load_state_dict(scheduled.state_dict())
    per_length = {"version": 1, "streams": {"8": plain.state_dict()}}  # the format before the one order
    with pytest.raises(ValueError, match="one position per sequence length") as error:
        scheduled.load_state_dict(per_length)
    assert "\n" not in str(error.value)
    with pytest.raises(KeyError, match="no data stream of sequence length 4"):
        scheduled.stream(4)


def test_every_length_must_divide_the_longest():
    with pytest.raises(SeqLenScheduleError, match=r"\[1\].seq_len=24 does not divide the schedule's longest length 32"):
        SeqLenSchedule([32, 24, 8], seq_len=96, micro_batch_size=1, global_batch_size=1)


# ----- train/pretrain.py runs ------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO, "train", "pretrain.py")
STEPS = 6
# a token budget of 4 x 128 = 512 per step: 2 steps of 2 x 256 tokens, then 1 step of 8 x 64, cycling
SCHEDULED = [
    "recipe=tiny",
    "train.seq_len=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    f"train.steps={STEPS}",
    "data.stdlib_max_mb=1",
    "data.tokenizer.train_max_mb=1",
    "train.log_interval=1",
    "train.progress_bar=false",
    "optim.warmup_steps=2",
    "train.export_hf=false",
]
SCHEDULE = "train.seq_len_schedule=[{seq_len:256,steps:2},{seq_len:64,steps:1}]"
EXPECTED_LENGTHS = [256, 256, 64, 256, 256, 64]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    values = dict(os.environ)
    values.update(
        LATENTFORGE_CACHE=str(tmp_path_factory.mktemp("cache")),
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return values


def pretrain(env, *overrides, nproc=1):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launcher, PRETRAIN, *SCHEDULED, *overrides]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def records_by_step(run_dir) -> dict:
    """The last record of every step (a resumed run appends after the records of the run it continues)."""
    return {r["step"]: r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    out = pretrain(env, f"train.run_dir={run_dir}", SCHEDULE)
    return records_by_step(run_dir), out


def test_logged_lengths_follow_the_schedule_at_a_constant_token_budget(straight):
    records, out = straight
    assert sorted(records) == list(range(1, STEPS + 1))
    assert [records[s]["seq_len"] for s in records] == EXPECTED_LENGTHS
    assert [records[s]["micro_batch_size"] for s in records] == [1, 1, 4, 1, 1, 4]
    assert {records[s]["tokens"] for s in records} == {512}
    assert [records[s]["tokens_seen"] for s in records] == [512 * s for s in range(1, STEPS + 1)]
    assert "phase 1: 1 step(s) at 64 tokens, 8 sequences per step, micro-batch 4 x 2" in out


def test_the_first_long_step_equals_a_plain_run_at_that_length(straight, env, tmp_path):
    """The 256-token stream is the data a run at seq_len 256 (2 sequences per step) reads: its first step's loss."""
    plain = str(tmp_path / "plain")
    pretrain(
        env,
        f"train.run_dir={plain}",
        "train.seq_len=256",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        "train.stop_at_step=1",
    )
    assert records_by_step(plain)[1]["loss"] == straight[0][1]["loss"]


@pytest.mark.slow
def test_resume_at_and_inside_a_phase_equals_the_uninterrupted_run_bitwise(straight, env, tmp_path):
    run_dir = str(tmp_path / "resumed")
    # stop after step 2: the resume starts right at the change to 64 tokens; after step 4: inside a 256-token phase
    for stop in (2, 4, STEPS):
        out = pretrain(env, f"train.run_dir={run_dir}", SCHEDULE, f"train.stop_at_step={stop}")
        if stop > 2:
            assert f"step_{stop - 2:08d} at step {stop - 2}" in out
    expected, got = straight[0], records_by_step(run_dir)
    assert sorted(got) == sorted(expected)
    assert [got[s]["loss"] for s in got] == [expected[s]["loss"] for s in got]
    assert [got[s]["seq_len"] for s in got] == EXPECTED_LENGTHS


@pytest.mark.slow
def test_the_schedule_under_cp2_on_two_processes_equals_one_process(straight, env, tmp_path):
    run_dir = str(tmp_path / "cp2")
    pretrain(env, f"train.run_dir={run_dir}", SCHEDULE, "parallel.cp=2", nproc=2)
    expected, got = straight[0], records_by_step(run_dir)
    assert [got[s]["seq_len"] for s in sorted(got)] == EXPECTED_LENGTHS
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-4, abs=1e-4), step


# ----- phases without context parallelism (cp: false) ------------------------------------------------------------
def test_a_phase_without_cp_spreads_its_sequences_over_dp_x_cp_ranks():
    phases = [1024, {"seq_len": 64, "steps": 1, "cp": False}]
    schedule = SeqLenSchedule(phases, seq_len=1024, micro_batch_size=1, global_batch_size=8, dp_size=2, cp=4)
    long, short = schedule.shape(1), schedule.shape(2)
    assert (long.context_parallel, long.cp_ranks_as_dp, long.grad_accumulation(2)) == (True, 1, 4)
    # 128 sequences of 64 tokens; a micro-batch keeps the 1024 / 4 tokens a rank held under CP: 4 sequences,
    # over 2 x 4 ranks: 4 micro-batches each
    assert (short.context_parallel, short.cp_ranks_as_dp, short.global_batch_size) == (False, 4, 128)
    assert (short.micro_batch_size, short.grad_accumulation(2)) == (4, 4)
    # 4 x 1024 tokens: 8 sequences of 512, one per micro-batch at least, cannot feed 4 x 4 ranks
    with pytest.raises(SeqLenScheduleError, match=r"\[1\].seq_len=512: .* over 4 data-parallel x 4 CP rank"):
        SeqLenSchedule([1024, {"seq_len": 512, "steps": 1, "cp": False}], 1024, 1, 4, dp_size=4, cp=4)
    # one process (or cp=1): cp: false changes nothing
    assert SeqLenSchedule(phases, seq_len=1024, micro_batch_size=1, global_batch_size=8).shape(2).cp_ranks_as_dp == 1


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ([{"seq_len": 64, "steps": 1, "cp": "no"}], "[0].cp must be true or false"),
        ([64, {"seq_len": 64, "steps": 1, "cp": False}], "[1]: seq_len=64 appears both with and without cp"),
    ],
)
def test_bad_cp_switches_give_one_clear_line(raw, fragment):
    with pytest.raises(SeqLenScheduleError) as error:
        SeqLenSchedule(raw, seq_len=64, micro_batch_size=2, global_batch_size=8)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_phase_without_cp_is_checked_against_the_layout_without_cp():
    # tiny: chunk_size 32; with cp=2 a 32-token sequence leaves 16 tokens per rank, without CP it is one whole chunk
    setup = load_configs(["recipe=tiny", "parallel.cp=2", "train.seq_len_schedule=[256,{seq_len:32,steps:1,cp:false}]"])
    assert setup.train.seq_len_schedule[1] == {"seq_len": 32, "steps": 1, "cp": False}
    # a budget of 2 x 192 tokens: 128 sequences of 3 tokens per step, which do not split over tp=2
    with pytest.raises(TrainConfigError, match=r"\[1\].seq_len=3 \(the phase runs with cp: false\): .*tp \(2\)"):
        load_configs(
            [
                "recipe=tiny",
                "parallel.cp=2",
                "parallel.tp=2",
                "train.seq_len=192",
                "train.micro_batch_size=1",
                "train.global_batch_size=2",
                "train.seq_len_schedule=[192,{seq_len:3,steps:1,cp:false}]",
            ]
        )


NO_CP_SCHEDULE = "train.seq_len_schedule=[{seq_len:256,steps:2},{seq_len:64,steps:1,cp:false}]"


@pytest.mark.slow
def test_cp2_with_a_phase_without_cp_equals_one_process_and_resumes_bitwise(straight, env, tmp_path):
    """cp=2 on 2 processes, the 64-token phase without CP (each CP rank reads 4 of its 8 sequences, 2 per micro-batch, as a
    data-parallel rank): every step's loss equals the one-process run (whose cp: false changes nothing), so the
    parameters after each step agree too; stopped at step 2 (the change to the no-CP phase) and step 3 (back to
    CP) the resumed run equals the uninterrupted cp=2 run bitwise."""
    run_dir, resumed_dir = str(tmp_path / "cp2"), str(tmp_path / "cp2_resumed")
    out = pretrain(env, f"train.run_dir={run_dir}", NO_CP_SCHEDULE, "parallel.cp=2", nproc=2)
    assert "micro-batch 2 x 2 per rank (cp: false, CP ranks read as data-parallel)" in out
    expected, got = straight[0], records_by_step(run_dir)
    assert [got[s]["seq_len"] for s in sorted(got)] == EXPECTED_LENGTHS
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5, abs=1e-6), step
    for stop in (2, 3, STEPS):
        pretrain(
            env, f"train.run_dir={resumed_dir}", NO_CP_SCHEDULE, "parallel.cp=2", f"train.stop_at_step={stop}", nproc=2
        )
    resumed = records_by_step(resumed_dir)
    assert [resumed[s]["loss"] for s in sorted(resumed)] == [got[s]["loss"] for s in sorted(got)]


def test_the_long_context_mix_recipe_plans_1m_on_cp64_and_4k_without_cp(capsys):
    """recipes/recipe/super_120b_long_mixed.yaml: the 1M phase on CP64 x TP2, the 4K phase with the CP ranks as
    data-parallel ones (dp_shard 64), 4 x 4096 tokens per micro-batch (the 16K tokens a rank held under CP)."""
    from latentforge.train.pretrain import main

    assert main(["recipe=super_120b_long_mixed", "--dry-run", "--world-size", "128"]) == 0
    out = capsys.readouterr().out
    long_plan, short_plan = out.split("phase(s) at 4096 tokens, without CP (cp: false):")
    assert "dp_shard 1, cp 64, tp 2" in long_plan and "dp_shard 64, cp 1, tp 2" in short_plan
    assert "4096 sequences x 4096 tokens = 16,777,216 tokens per step; micro-batch 4" in short_plan
    assert long_plan.count("fits an 80 GB GPU") == 1 and short_plan.count("fits an 80 GB GPU") == 1
    assert "NOT" not in out
