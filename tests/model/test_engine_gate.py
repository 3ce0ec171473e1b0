"""Speculation that gates itself: the gate's decisions from measured costs and accepted lengths, and an engine that
switches drafting off and on mid-sequence keeps greedy output and drafts exactly those of the MTP chain."""

import itertools

import pytest
import torch

from latentforge.model.engine import Engine, EngineConfig, SamplingParams
from latentforge.model.engine.gate import DraftGate
from tests.model.test_engine import MAX_NEW, PROMPTS, make_model, reference_greedy


@pytest.fixture(scope="module")
def fp64_model():
    return make_model()


@pytest.fixture(scope="module")
def greedy_references(fp64_model):
    return [reference_greedy(fp64_model, p, n) for p, n in zip(PROMPTS, MAX_NEW)]


# ----- the gate alone ---------------------------------------------------------------------------------------------
def drive(gate, steps, plain_s, draft_s, accepted, rows=4):
    """Run the gate for `steps` steps on a fixed cost model; returns the modes it chose."""
    modes = []
    for _ in range(steps):
        drafting = gate.choose()
        modes.append(drafting)
        gate.record(drafting, draft_s if drafting else plain_s, rows, int(round(accepted * rows)) if drafting else rows)
    return modes


def test_gate_keeps_drafting_that_pays_and_measures_the_plain_cost_once():
    gate = DraftGate(probe_interval=10, probe_steps=3)
    modes = drive(gate, 40, plain_s=1.0, draft_s=1.25, accepted=2.5)
    assert gate.on and gate.expected_speedup() == pytest.approx(2.5 / 1.25)
    assert modes[:3] == [True] * 3 and modes[3:6] == [False] * 3  # the first probe measures plain decoding
    assert modes.count(False) < len(modes) / 3  # then only short periodic probes


def test_gate_turns_drafting_off_when_slower_and_back_on_when_a_probe_says_it_pays():
    gate = DraftGate(probe_interval=8, probe_steps=3)
    drive(gate, 10, plain_s=1.0, draft_s=2.0, accepted=1.25)  # drafts rarely accepted: 0.625x
    assert not gate.on and gate.expected_speedup() == pytest.approx(0.625)
    modes = drive(gate, 20, plain_s=1.0, draft_s=2.0, accepted=1.25)
    assert modes.count(True) <= 2 * 3  # only probes draft now
    drive(gate, 30, plain_s=1.0, draft_s=1.2, accepted=3.0)  # new weights: drafts accepted, 2.5x
    assert gate.on
    assert drive(gate, 16, plain_s=1.0, draft_s=1.2, accepted=3.0).count(True) >= 12  # plain only in probes


def test_gate_hysteresis_does_not_flap_near_break_even():
    gate = DraftGate(probe_interval=4, probe_steps=2, margin=0.05)
    modes = drive(gate, 60, plain_s=1.0, draft_s=1.0, accepted=1.02)  # 1.02x: inside the margin
    assert gate.on and modes[-20:].count(True) >= 14


def test_gate_settings_are_checked():
    with pytest.raises(ValueError, match="probe_steps"):
        DraftGate(probe_steps=1)
    with pytest.raises(ValueError, match="draft_probe_interval"):
        EngineConfig(draft_tokens=2, draft_gate=True, draft_probe_interval=0)


# ----- the engine under a gate ------------------------------------------------------------------------------------
@torch.no_grad()
def mtp_chain_drafts(model, sequence, p, k):
    """Greedy drafts of depths 1..k for a row that consumed p tokens (sequence[p] chosen): the training chain."""
    hidden = model(torch.tensor([sequence[:p]])).hidden
    tokens, drafts = sequence[: p + 1], []
    for depth in range(1, k + 1):
        hidden, _ = model.mtp(model.backbone.embeddings(torch.tensor([tokens[depth : depth + p]])), hidden)
        drafts.append(int(model.lm_head(hidden[0, -1]).argmax()))
        tokens = tokens + [drafts[-1]]
    return drafts


def test_switching_mid_sequence_keeps_greedy_output_and_true_drafts(fp64_model, greedy_references):
    """A scripted gate flips modes every few steps while 5 requests of different lengths share 3 slots; each draft
    step (right after the MTP caches caught up on the plainly decoded tokens) drafts what the MTP chain over the
    whole sequence drafts, and the tokens are exactly greedy decoding's."""
    k = 3
    engine = Engine(fp64_model, EngineConfig(max_batch=3, max_seq_len=40, draft_tokens=k, draft_gate=True))
    script = itertools.cycle([True, False, False, True, True, False, True, False, False, False])
    engine.gate.choose = lambda: next(script)
    checked = []
    resume = engine._resume_drafting

    def checked_resume(drafter):
        resume(drafter)
        for row, request in enumerate(engine.running):
            expected = mtp_chain_drafts(fp64_model, request.sequence, request.processed, k)
            assert engine.drafter.drafts[row].tolist() == expected
            checked.append(request.processed)

    engine._resume_drafting = checked_resume
    results = engine.generate(PROMPTS, [SamplingParams(temperature=0, max_new_tokens=n) for n in MAX_NEW])
    assert [r.token_ids for r in results] == greedy_references
    assert engine.stats.undrafted_steps > 5 and engine.stats.verify_rows > 5 and len(checked) > 10


def test_measured_costs_switch_drafting_off_and_on_with_the_same_output(fp64_model):
    """A fake clock charges each main-model forward by its positions. First the per-position cost dominates and
    the (random) drafts are rarely accepted: drafting loses, the gate turns it off. Then per-call overhead
    dominates and the drafts are the true continuation (as after training): a probe finds it pays, drafting comes
    back on. The gate's mode and estimate are logged per step; the tokens stay greedy decoding's throughout."""
    k, new_tokens, change_at = 2, 60, 14
    prompts = [p * 3 for p in PROMPTS]
    expected = [reference_greedy(fp64_model, p, new_tokens) for p in prompts]
    engine = Engine(
        fp64_model, EngineConfig(max_batch=5, max_seq_len=120, draft_tokens=k, draft_gate=True, draft_probe_interval=4)
    )
    cost = {"now": 0.0, "per_call": 0.0, "per_position": 1.0, "oracle": False}
    engine.gate.clock = lambda: cost["now"]
    step, catch_up = engine.runner.step, engine.drafter.catch_up
    truth = {tuple(p): e + [0] * (k + 1) for p, e in zip(prompts, expected)}

    def charged_step(ids, pos, max_pos, keep_positions):
        cost["now"] += cost["per_call"] + cost["per_position"] * ids.shape[1]
        return step(ids, pos, max_pos, keep_positions)

    def drafts_after_training(lo, sequences, new_processed, trunk_hidden, sampler):
        catch_up(lo, sequences, new_processed, trunk_hidden, sampler)
        if cost["oracle"]:
            for i, sequence in enumerate(sequences):
                request = engine.running[lo + i]
                start = len(sequence) - len(request.result.prompt_ids)
                engine.drafter.drafts[lo + i] = torch.tensor(truth[tuple(request.result.prompt_ids)][start : start + k])

    engine.runner.step, engine.drafter.catch_up = charged_step, drafts_after_training
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=new_tokens))
    modes, estimates, results = [], [], {}
    while engine.has_unfinished():
        if engine.stats.steps == change_at:
            cost.update(per_call=20.0, per_position=0.1, oracle=True)
        for result in engine.step():
            results[result.request_id] = result.token_ids
        modes.append(engine.stats.draft_on)
        estimates.append(engine.stats.expected_draft_speedup)
    assert [results[i] for i in range(len(prompts))] == expected
    before = modes[8:change_at]  # after the first probe of plain decoding
    assert before.count(False) > before.count(True) and estimates[change_at - 1] < 0.95
    after = modes[change_at + 6 :]  # drafting back on, plain decoding only in the periodic probes
    assert after.count(True) >= 2 * after.count(False) and modes[-3:] == [True] * 3 and estimates[-1] > 1.5
