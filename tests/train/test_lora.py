"""LoRA behaviour: targets by pattern, frozen base with optimizer state on adapters only, the adapter math against
a hand-written W x + s B A x, rsLoRA, dropout, a bf16 base, clear errors; and the same loss and adapter gradients
under the runner's tensor parallelism and FSDP2 (2 gloo ranks) as in one process."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import HybridModel
from tests.distributed import run_distributed
from tests.model.test_hf import randomize, tiny_config
from train.config import OptimConfig
from train.lora import (LoRAConfig, LoRAConfigError, apply_lora, attach_tp_slices, lora_parameters,
                        lora_state_dict, merge_lora)
from train.optim import OptimizerContainer


def build(pattern="M*E-", seed=0, **overrides):
    torch.manual_seed(seed)
    model = HybridModel(tiny_config(pattern=pattern, moe_latent_size=24, **overrides))
    randomize(model)
    return model


def fill_adapters(model, seed=5, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def test_default_targets_freeze_and_identity_at_init():
    model = build(mtp_depths=2)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13))
    with torch.no_grad():
        before = model(ids).logits
    adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert adapted == [
        "backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
        "backbone.layers.1.mixer.q_proj", "backbone.layers.1.mixer.k_proj", "backbone.layers.1.mixer.v_proj",
        "backbone.layers.1.mixer.o_proj",
        "backbone.layers.2.mixer.shared_experts.up_proj", "backbone.layers.2.mixer.shared_experts.down_proj"]
    # the state-dict names of the base are untouched (base checkpoints load as before)
    assert "backbone.layers.1.mixer.q_proj.weight" in model.state_dict()
    assert isinstance(model.backbone.layers[1].mixer.q_proj, torch.nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # B = 0: the adapter starts as a no-op


def test_adapter_math_rslora_and_dropout():
    model = build()
    layer = model.backbone.layers[1].mixer.q_proj
    weight = layer.weight.detach().clone()
    apply_lora(model, LoRAConfig(rank=4, alpha=6, use_rslora=True, dropout=0.5, targets=["q_proj"]))
    fill_adapters(model)
    x = torch.randn(3, 48)
    expected = x @ weight.T + (6 / math.sqrt(4)) * (x @ layer.lora_A.T) @ layer.lora_B.T
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.train()
    torch.manual_seed(1)
    dropped = layer(x)
    torch.manual_seed(1)
    mask_x = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(dropped, x @ weight.T + 3 * (mask_x @ layer.lora_A.T) @ layer.lora_B.T,
                               rtol=1e-6, atol=1e-6)


def test_routed_experts_adapter_is_per_expert():
    model = build(pattern="E")
    experts = model.backbone.layers[0].mixer.experts
    up = experts.up_proj.detach().clone()
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=[], routed_experts=True))
    fill_adapters(model)
    e = 5
    expected = up[e] + experts.lora_B_up_proj[e] @ experts.lora_A_up_proj[e]
    torch.testing.assert_close(up[e] + experts.lora_expert_delta("up_proj")[e], expected)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 9))
    with torch.no_grad():
        adapted = model(ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-6)


def test_only_adapters_train_and_get_optimizer_state():
    model = build()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    fill_adapters(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    optimizer = OptimizerContainer([model], OptimConfig(lr=1e-2, weight_decay=0.0))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11))
    model(ids, labels=ids.roll(-1, 1)).loss.backward()
    optimizer.step()
    state = optimizer.optimizers[0].state
    assert {id(p) for p in state} == {id(p) for p in lora_parameters(model).values()}
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]) and p.grad is None, n
    assert all(not torch.equal(p, adapters[n]) for n, p in lora_parameters(model).items())


def test_bf16_base_with_fp32_adapters():
    model = build()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, base_dtype="bfloat16"))
    fill_adapters(model)
    assert model.backbone.layers[1].mixer.q_proj.weight.dtype == torch.bfloat16
    assert model.backbone.embeddings.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(model).values())
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11))
    loss = model(ids, labels=ids.roll(-1, 1)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(model).values())


@pytest.mark.parametrize("cfg, message", [
    (dict(targets=["q_projection"]), "match no Linear"),
    (dict(targets=["mixer"]), "not a Linear"),
    (dict(routed_experts=True, dropout=0.1), "dropout=0"),
    (dict(rank=0), "rank"),
    (dict(base_dtype="float8"), "base_dtype"),
])
def test_bad_settings_are_clear_errors(cfg, message):
    with pytest.raises(LoRAConfigError, match=message):
        apply_lora(build(), LoRAConfig(**cfg))


def test_unknown_key_is_named():
    with pytest.raises(LoRAConfigError, match="ranks"):
        LoRAConfig.from_dict({"ranks": 4})


# ----- distributed: the runner's tensor parallelism and FSDP2 ----------------------------------------------------
def _grads(model) -> dict:
    out = {}
    for name, p in lora_parameters(model).items():
        grad = p.grad
        out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return out


def _runner_worker(rank, world_size):
    import copy

    from train.parallel import ParallelConfig, build_runner

    ids = torch.randint(0, 211, (4, 16), generator=torch.Generator().manual_seed(7))
    labels = ids.roll(-1, 1)
    seq_idx = torch.zeros_like(ids, dtype=torch.int32)
    seq_idx[:, 9:] = 1  # two documents per row: the adapters must respect the resets too
    results = {}
    for name, layout in (("tp", dict(tp=2, dp_shard=1)), ("fsdp", dict(dp_shard=2))):
        model = build(moe_aux_loss_coeff=0.0)
        apply_lora(model, LoRAConfig(rank=4, alpha=8))  # every default target: Mamba in/out, q/k/v/o, shared
        fill_adapters(model)
        reference = copy.deepcopy(model)
        ref_loss = reference(ids, labels=labels, seq_idx=seq_idx).loss
        ref_loss.backward()

        runner = build_runner(model, model.cfg, ParallelConfig(**layout))
        tp_layers = attach_tp_slices(runner.model_parts)
        assert tp_layers == (8 if name == "tp" else 0)
        rows = slice(runner.dp_rank * 4 // runner.dp_size, (runner.dp_rank + 1) * 4 // runner.dp_size)
        result = runner.forward_backward([{"input_ids": ids[rows], "labels": labels[rows], "seq_idx": seq_idx[rows]}])
        assert abs(result["loss"] - ref_loss.item()) < 1e-5 * abs(ref_loss.item()), name
        got, expected = _grads(runner.model_parts[0]), _grads(reference)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-7, msg=f"{name}: grad of {key}")
        assert all(p.grad is None for n, p in runner.model_parts[0].named_parameters() if "lora_" not in n)
        state = lora_state_dict(runner.model_parts[0])  # a collective: gathers the FSDP shards
        assert all(torch.equal(state[k], v) for k, v in lora_state_dict(reference).items())
        results[name] = len(expected)
    return results


def test_adapters_under_tensor_parallel_and_fsdp():
    assert run_distributed(_runner_worker, 2) == [{"tp": 16, "fsdp": 16}] * 2
