"""A decode or verify step of the engine reads device values once (`transfer.to_host`), whatever the batch, the
draft depth or the sampling: on a GPU every other read (`tolist`, `item`, `bool(tensor)`, ...) would stall the host
until the device's queue drains, once per token.

On CPU every tensor is a host tensor, so the reads are counted at the Python methods that would wait on a device:
any call of them during a step, outside `to_host` and on a tensor that `to_host` did not return, is a stray read."""

import pytest
import torch

from latentforge.model.engine import Engine, EngineConfig, SamplingParams
from latentforge.model.engine import drafter as drafter_module
from latentforge.model.engine import engine as engine_module
from tests.model.test_engine import PROMPTS, make_model

READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


class ReadCounter:
    """Counts stray device reads and `to_host` calls while `counting` is on."""

    def __init__(self, monkeypatch):
        self.counting = False
        self.inside_to_host = False
        self.host_storages: set = set()
        self.host_copies: list = []
        self.stray: list = []
        self.read_backs = 0
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        original_to_host = engine_module.to_host

        def counted_to_host(*tensors):
            self.inside_to_host = True
            try:
                copies = original_to_host(*tensors)
            finally:
                self.inside_to_host = False
            if self.counting:
                self.read_backs += 1
            # the copies stay referenced so that no later tensor reuses their memory and passes for host data
            self.host_copies.extend(copies)
            self.host_storages.update(c.untyped_storage().data_ptr() for c in copies)
            return copies

        monkeypatch.setattr(engine_module, "to_host", counted_to_host)

    def _wrap(self, name, method):
        counter = self

        def read(tensor, *args, **kwargs):
            if counter.counting and not counter.inside_to_host:
                if tensor.untyped_storage().data_ptr() not in counter.host_storages:
                    counter.stray.append(name)
            return method(tensor, *args, **kwargs)

        return read

    def step(self, engine: Engine) -> tuple[int, list]:
        self.read_backs, self.stray = 0, []
        self.counting = True
        try:
            engine.step()
        finally:
            self.counting = False
        return self.read_backs, self.stray


@pytest.mark.parametrize(
    "draft_tokens, params",
    [
        (0, SamplingParams(temperature=0, max_new_tokens=12)),
        (2, SamplingParams(temperature=0, max_new_tokens=12)),
        (3, SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=12, return_logits=True)),
    ],
    ids=["plain-greedy", "draft2-greedy", "draft3-sampled-logits"],
)
def test_a_step_reads_the_device_once(monkeypatch, draft_tokens, params):
    model = make_model(dtype=torch.float32)
    engine = Engine(model, EngineConfig(max_batch=4, max_seq_len=64, draft_tokens=draft_tokens, record_routes=True))
    # five prompts over four slots: rows join late and leave at different steps (stops, lengths)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, SamplingParams(**{**params.__dict__, "max_new_tokens": 6 + 2 * i, "seed": i}))
    counter = ReadCounter(monkeypatch)
    steady_steps = 0
    while engine.has_unfinished():
        joining = bool(engine.waiting) and len(engine.running) < engine.config.max_batch
        read_backs, stray = counter.step(engine)
        assert stray == [], f"device reads outside to_host in a step: {stray}"
        if not joining:
            assert read_backs == 1, f"a decode/verify step read the device back {read_backs} times"
            steady_steps += 1
        else:  # the joining rows' first tokens, then the running rows' step
            assert read_backs <= 2
    assert steady_steps >= 5
    assert engine.stats.generated_tokens == sum(6 + 2 * i for i in range(len(PROMPTS)))


def test_the_counter_sees_a_stray_read(monkeypatch):
    """The check above can fail: a `.tolist()` of a device value in the drafter is caught."""
    model = make_model(dtype=torch.float32)
    engine = Engine(model, EngineConfig(max_batch=2, max_seq_len=64, draft_tokens=2))
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=8))
    original = drafter_module.MTPDrafter.catch_up

    def catch_up_with_a_read(self, lo, sequences, new_processed, trunk_hidden, sampler):
        trunk_hidden.sum().item()
        return original(self, lo, sequences, new_processed, trunk_hidden, sampler)

    monkeypatch.setattr(drafter_module.MTPDrafter, "catch_up", catch_up_with_a_read)
    counter = ReadCounter(monkeypatch)
    engine.step()  # admission
    _, stray = counter.step(engine)
    assert stray == ["item"]
