"""LoRA behaviour: targets by pattern, frozen base with optimizer state on adapters only, the adapter math against
a hand-written W x + s B A x, rsLoRA, dropout, a bf16 base, the PEFT warning for Mamba out_proj, clear errors; and
the same loss, adapter gradients and adapters after an AdamW step under the runner's tensor, expert and pipeline
parallelism and FSDP2 (2 gloo ranks) as in one process, with the base still frozen and optimizer state on the
adapters only."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from latentforge.model import HybridModel
from tests.distributed import run_distributed
from tests.model.test_hf import randomize, tiny_config
from latentforge.train.config import OptimConfig
from latentforge.train.loss import model_loss
from tests.train.loss_reference import reference_loss
from latentforge.train.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    LoRAConfigError,
    PEFTCompatibilityWarning,
    apply_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    tensor_parallel_adapters,
)
from latentforge.train.optim import OptimizerContainer


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
    with warnings.catch_warnings():
        warnings.simplefilter("error", PEFTCompatibilityWarning)  # the default targets load with stock PEFT
        adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert adapted == [
        "backbone.layers.0.mixer.in_proj",
        "backbone.layers.1.mixer.q_proj",
        "backbone.layers.1.mixer.k_proj",
        "backbone.layers.1.mixer.v_proj",
        "backbone.layers.1.mixer.o_proj",
        "backbone.layers.2.mixer.shared_experts.up_proj",
        "backbone.layers.2.mixer.shared_experts.down_proj",
    ]
    # the state-dict names of the base are untouched (base checkpoints load as before)
    assert "backbone.layers.1.mixer.q_proj.weight" in model.state_dict()
    assert isinstance(model.backbone.layers[1].mixer.q_proj, torch.nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # B = 0: the adapter starts as a no-op


def test_mamba_out_proj_is_opt_in_with_a_peft_warning():
    model = build()
    with pytest.warns(PEFTCompatibilityWarning, match="PEFT .* refuses LoRA on a module named out_proj"):
        adapted = apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=DEFAULT_TARGETS + ["out_proj"]))
    assert "backbone.layers.0.mixer.out_proj" in adapted


def test_merge_and_remove_leave_the_base_layer():
    """in_proj's adapter knows its z | x | B | C | dt row blocks (tensor parallelism slices each); merge and remove
    leave a plain Linear with no adapter attribute."""
    for undo in (merge_lora, remove_lora):
        model = build()
        apply_lora(model, LoRAConfig(rank=2, alpha=2))
        mixer = model.backbone.layers[0].mixer
        assert mixer.in_proj.lora_row_blocks == mixer.in_proj_blocks()
        q_proj = model.backbone.layers[1].mixer.q_proj
        assert q_proj.lora_row_blocks == [q_proj.out_features]
        undo(model)
        assert type(mixer.in_proj) is torch.nn.Linear
        assert not any(k.startswith("lora_") for m in model.modules() for k in m.__dict__)


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
    torch.testing.assert_close(
        dropped, x @ weight.T + 3 * (mask_x @ layer.lora_A.T) @ layer.lora_B.T, rtol=1e-6, atol=1e-6
    )


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
    model_loss(model, ids, ids.roll(-1, 1)).loss.backward()
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
    loss = model_loss(model, ids, ids.roll(-1, 1)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(model).values())


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(targets=["q_projection"]), "match no Linear"),
        (dict(targets=["mixer"]), "not a Linear"),
        (dict(routed_experts=True, dropout=0.1), "dropout=0"),
        (dict(rank=0), "rank"),
        (dict(base_dtype="float8"), "base_dtype"),
    ],
)
def test_bad_settings_are_clear_errors(cfg, message):
    with pytest.raises(LoRAConfigError, match=message):
        apply_lora(build(), LoRAConfig(**cfg))


def test_unknown_key_is_named():
    with pytest.raises(LoRAConfigError, match="ranks"):
        LoRAConfig.from_dict({"ranks": 4})


# ----- distributed: the runner's tensor, expert and pipeline parallelism, FSDP2 ---------------------------------
def _grads(model) -> dict:
    out = {}
    for name, p in lora_parameters(model).items():
        grad = p.grad
        out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return out


# name: (parallel layout, LoRA settings, model settings). TP: every Linear kind incl. the row-parallel Mamba out_proj
# and the Mamba in_proj's rows (a slice of each of its five blocks); EP: the routed experts' own
# adapters sharded with them (the experts frozen); PP: two stages (layers 0-2 | layer 3 and the MTP block, fed by the
# frozen embedding of the first stage), the dense MLP and the MTP block adapted so the last stage has adapters too.
DIST_LAYOUTS = {
    "tp": (dict(tp=2, dp_shard=1), dict(targets=DEFAULT_TARGETS + ["out_proj"]), {}),
    "fsdp": (dict(dp_shard=2), {}, {}),
    "ep": (dict(ep=2, dp_shard=2), dict(routed_experts=True), {}),
    "pp": (
        dict(pp=2, dp_shard=1),
        dict(targets=DEFAULT_TARGETS + ["up_proj", "down_proj"], include_mtp=True),
        dict(mtp_depths=1),
    ),
}


def _layouts_worker(rank, world_size):
    import copy

    from latentforge.train.parallel import ParallelConfig, build_runner

    ids = torch.randint(0, 211, (4, 16), generator=torch.Generator().manual_seed(7))
    labels = ids.roll(-1, 1)
    seq_idx = torch.zeros_like(ids, dtype=torch.int32)
    seq_idx[:, 9:] = 1  # two documents per row: the adapters must respect the resets too
    labels[:, 8] = -100
    # eps 1e-4: AdamW's first step is ~ lr * sign(g), which float noise could flip where g ~ 0
    optim_cfg = OptimConfig(lr=1e-2, weight_decay=0.0, eps=1e-4)
    summary = {}
    for name, (layout, lora_kw, model_kw) in DIST_LAYOUTS.items():
        model = build(moe_aux_loss_coeff=0.0, expert_bias_update_rate=0.0, **model_kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PEFTCompatibilityWarning)
            apply_lora(model, LoRAConfig(rank=4, alpha=8, **lora_kw))
        fill_adapters(model)
        reference = copy.deepcopy(model)
        ref_loss = reference_loss(reference, ids, labels, seq_idx=seq_idx).loss
        ref_loss.backward()
        expected_grads = _grads(reference)
        OptimizerContainer([reference], optim_cfg).step()
        expected_after = lora_state_dict(reference)

        runner = build_runner(model, model.cfg, ParallelConfig(**layout))
        parts = runner.model_parts
        for part in parts:  # parallelisation re-creates sharded parameters: the flags must survive
            for pname, p in part.named_parameters():
                assert p.requires_grad == (".lora_" in pname), f"{name}: {pname} requires_grad={p.requires_grad}"
        optimizer = OptimizerContainer(parts, optim_cfg)
        rows = slice(runner.dp_rank * 4 // runner.dp_size, (runner.dp_rank + 1) * 4 // runner.dp_size)
        mine = {"input_ids": ids[rows], "labels": labels[rows], "seq_idx": seq_idx[rows]}
        n_micro = 2 if layout.get("pp", 1) > 1 else 1
        step = mine["input_ids"].shape[0] // n_micro
        micro = [{k: v[i * step : (i + 1) * step] for k, v in mine.items()} for i in range(n_micro)]
        result = runner.forward_backward(micro)
        assert abs(result["loss"] - ref_loss.item()) < 1e-5 * abs(ref_loss.item()), (name, result["loss"], ref_loss)

        got = {}
        for part in parts:
            got.update(_grads(part))
        assert got and set(got) <= set(expected_grads), name
        for key, grad in got.items():
            torch.testing.assert_close(grad, expected_grads[key], rtol=1e-5, atol=1e-7, msg=f"{name}: grad of {key}")
        for part in parts:
            assert all(p.grad is None for n, p in part.named_parameters() if ".lora_" not in n), name

        optimizer.step()
        with_state = {id(p) for opt in optimizer.optimizers for p in opt.state}
        adapters = {id(p) for part in parts for p in lora_parameters(part).values()}
        assert with_state == adapters, f"{name}: optimizer state on {len(with_state)} tensors, {len(adapters)} adapters"
        after = {}
        for part in parts:
            after.update(lora_state_dict(part))  # a collective under FSDP / EP: full tensors
        assert after and set(after) <= set(expected_after), name
        for key, value in after.items():
            torch.testing.assert_close(value, expected_after[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")

        assert tensor_parallel_adapters(parts) == (8 if name == "tp" else 0), name
        summary[name] = sorted(got)
    return summary


def test_adapters_under_tensor_expert_pipeline_parallel_and_fsdp():
    results = run_distributed(_layouts_worker, 2)
    for name, (layout, lora_kw, model_kw) in DIST_LAYOUTS.items():
        model = build(**model_kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PEFTCompatibilityWarning)
            apply_lora(model, LoRAConfig(rank=4, alpha=8, **lora_kw))
        every = sorted(lora_parameters(model))
        if name == "pp":  # each stage's adapters on its own rank, together all of them
            assert sorted(results[0][name] + results[1][name]) == every and not set(results[0][name]) & set(
                results[1][name]
            )
        else:
            assert results[0][name] == results[1][name] == every, name
    assert any("experts.lora_A_up_proj" in n for n in results[0]["ep"])
