"""`EngineConfig(compile=True)`: the decode / verify steps through torch.compile (inductor on CPU) give the eager
engine's tokens and logits, with and without drafting, and after a weight update (the compiled graph reads the
updated parameters, it did not fold the old ones in).

float64 so that no argmax can flip on a fused kernel's rounding; the logits a result keeps are float32, so they
agree to float32's rounding (inductor's reordered float64 sums differ far below it). Three rows that start and end
together keep to two compiled graphs (decode, verify): a cold compile is most of this test's time."""

import pytest
import torch

from latentforge.model.engine import Engine, EngineConfig, SamplingParams
from tests.model.test_engine import PROMPTS, make_model


def generate(model, compile: bool, draft_tokens: int, update=None):
    engine = Engine(model, EngineConfig(max_batch=3, max_seq_len=48, draft_tokens=draft_tokens, compile=compile))
    if update is not None:
        engine.update_weights(update, version=1)
    results = engine.generate(PROMPTS[:3], SamplingParams(temperature=0, max_new_tokens=8, return_logits=True))
    return engine, results


@pytest.mark.slow
def test_compiled_steps_equal_eager_ones_before_and_after_a_weight_update(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold compile, as on a new machine
    torch._dynamo.reset()
    model = make_model(pattern="M*E")  # each stateful layer kind once: a small graph to compile
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    update = {name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in original.items()}
    outputs = {}
    for weights in ("original", "updated"):
        for draft_tokens in (0, 2):
            model.load_state_dict(original)
            compiled_engine, compiled = generate(model, True, draft_tokens, update if weights == "updated" else None)
            assert compiled_engine.runner.step_forward is not model  # the steps did go through torch.compile
            model.load_state_dict(original)
            _, eager = generate(model, False, draft_tokens, update if weights == "updated" else None)
            for got, want in zip(compiled, eager):
                assert got.token_ids == want.token_ids, (weights, draft_tokens)
                torch.testing.assert_close(got.logits, want.logits, rtol=1e-6, atol=1e-6)
            outputs[weights, draft_tokens] = [r.token_ids for r in eager]
    # drafting gives greedy's tokens, and the update changed them (so the equalities above could have failed)
    assert outputs["original", 0] == outputs["original", 2] and outputs["updated", 0] == outputs["updated", 2]
    assert outputs["original", 0] != outputs["updated", 0]
