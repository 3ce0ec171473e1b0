"""Precision policy, capability checks, in-place application and a short emulated NVFP4 training run."""

from pathlib import Path

import pytest
import torch
from torch import nn

from latentforge.kernels import quant as q
from latentforge.train.precision import (
    EmulatedLinear,
    PrecisionConfig,
    PrecisionConfigError,
    PrecisionUnsupportedError,
    apply_precision,
    check_support,
    format_table,
    resolve_policy,
)
from latentforge.train.loss import model_loss
from latentforge.train.precision.compare import markov_batches, tail_mean, train_loss_curve

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SUPER_PATTERN = (  # SPEC section 2
    "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"
)


@pytest.fixture(autouse=True)
def _one_thread():
    # small ops: one thread avoids OpenMP spin contention on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_recipe(name: str, **overrides) -> PrecisionConfig:
    from latentforge.model.recipes import group_values

    values = {**group_values("precision", name), **overrides}
    return PrecisionConfig.from_dict(values)


def small_model_config(**kw):
    from latentforge.model import ModelConfig

    base = dict(
        pattern="MEM*E-",
        hidden_size=64,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_groups=2,
        ssm_state_size=16,
        chunk_size=16,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=32,
        moe_latent_size=32,
        shared_expert_intermediate_size=64,
        mlp_intermediate_size=128,
        mtp_depths=1,
    )
    base.update(kw)
    return ModelConfig(**base)


class ToyMixer(nn.Module):
    def __init__(self, names):
        super().__init__()
        for n in names:
            setattr(self, n, nn.Linear(32, 32, bias=False))


class ToyModel(nn.Module):
    """Names like the real model's, plain nn.Linear everywhere (no model package needed)."""

    def __init__(self, n_layers=4):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.embeddings = nn.Embedding(10, 32)
        self.backbone.layers = nn.ModuleList()
        for _ in range(n_layers):
            block = nn.Module()
            block.mixer = ToyMixer(["in_proj", "out_proj", "q_proj"])
            self.backbone.layers.append(block)
        self.lm_head = nn.Linear(32, 10, bias=False)
        self.mtp = nn.Module()
        self.mtp.layers = nn.ModuleList([ToyMixer(["eh_proj"])])

    def forward(self, x):
        h = self.backbone.embeddings(x)
        for block in self.backbone.layers:
            m = block.mixer
            h = h + m.out_proj(torch.relu(m.in_proj(h))) + m.q_proj(h)
        return self.lm_head(h)


# ----------------------------------------------------------------------------------------------
# config


def test_every_recipe_file_loads_and_names_itself():
    names = sorted(p.stem for p in (RECIPES / "precision").glob("*.yaml"))
    assert names == sorted(q.RECIPES)
    for name in names:
        assert load_recipe(name).name == name


def test_recipe_is_selectable_with_hydra():
    from latentforge.model.recipes import compose

    try:
        cfg = compose(["precision=nvfp4"])
    except Exception:  # the root config does not list the precision group among its defaults yet
        cfg = compose(["+precision=nvfp4"])
    pc = PrecisionConfig.from_dict(cfg.precision)
    assert pc.name == "nvfp4" and pc.keep_last_layers == 14 and "mtp.*" in pc.keep_bf16


def test_config_errors_name_the_field():
    with pytest.raises(PrecisionConfigError, match="fp6.*bf16, fp8_current"):
        PrecisionConfig(name="fp6")
    with pytest.raises(PrecisionConfigError, match="unknown precision config key.*'keep_lasts'"):
        PrecisionConfig.from_dict({"name": "nvfp4", "keep_lasts": 3})
    with pytest.raises(PrecisionConfigError, match="keep_bf16 must be a list"):
        PrecisionConfig(keep_bf16="*.q_proj")


# ----------------------------------------------------------------------------------------------
# policy


def test_policy_rule_order_on_toy_model():
    cfg = PrecisionConfig(
        name="nvfp4",
        keep_bf16=["mtp.*", "*.q_proj"],
        keep_last_layers=1,
        keep_layers=[0],
        mxfp8=["backbone.layers.*.mixer.out_proj", "backbone.layers.*.mixer.q_proj"],
    )
    fmt = {e.name: (e.format, e.rule) for e in resolve_policy(ToyModel(), cfg)}
    assert fmt["backbone.embeddings"] == ("bf16", "never 'backbone.embeddings'")
    assert fmt["lm_head"] == ("bf16", "never 'lm_head'")
    assert fmt["mtp.layers.0.eh_proj"] == ("bf16", "keep_bf16 'mtp.*'")
    assert fmt["backbone.layers.0.mixer.in_proj"] == ("bf16", "keep_layers")
    assert fmt["backbone.layers.3.mixer.out_proj"] == ("bf16", "last 1 layers")
    assert fmt["backbone.layers.1.mixer.in_proj"] == ("nvfp4", "recipe")
    assert fmt["backbone.layers.2.mixer.out_proj"] == ("mxfp8", "mxfp8 'backbone.layers.*.mixer.out_proj'")
    # keep_bf16 wins over an mxfp8 pattern naming the same module
    assert fmt["backbone.layers.2.mixer.q_proj"] == ("bf16", "keep_bf16 '*.q_proj'")
    assert len(fmt) == 2 + 4 * 3 + 1
    # negative keep_layers count from the end; bf16 ignores every override
    fmt = {e.name: e.format for e in resolve_policy(ToyModel(), PrecisionConfig(name="mxfp8", keep_layers=[-2]))}
    assert fmt["backbone.layers.2.mixer.in_proj"] == "bf16" and fmt["backbone.layers.1.mixer.in_proj"] == "mxfp8"
    assert {e.format for e in resolve_policy(ToyModel(), PrecisionConfig(name="bf16", mxfp8=["*"]))} == {"bf16"}


def test_policy_refuses_to_keep_every_layer():
    with pytest.raises(PrecisionConfigError, match="keeps all 4 layers.*keep_last_layers below 4"):
        resolve_policy(ToyModel(), PrecisionConfig(name="nvfp4", keep_last_layers=14))
    with pytest.raises(PrecisionConfigError, match="keep_layers has 7"):
        resolve_policy(ToyModel(), PrecisionConfig(name="nvfp4", keep_layers=[7]))


def _spec_format(name: str) -> str:
    """SPEC section 5, written out per module from the SPEC section 2 pattern."""
    if name in ("backbone.embeddings", "lm_head"):
        return "bf16"
    if name.endswith(".gate"):
        return "fp32"  # router
    if name.startswith("mtp."):
        return "bf16"  # all MTP layers
    layer = int(name.split(".")[2])
    if layer >= 88 - 14:
        return "bf16"  # the last 14 layers
    kind, part = SUPER_PATTERN[layer], name.split(".mixer.")[1]
    if kind == "M":
        return {"in_proj": "nvfp4", "out_proj": "mxfp8"}[part]
    if kind == "*":
        assert part in ("q_proj", "k_proj", "v_proj", "o_proj")
        return "bf16"
    assert kind == "E"
    if part in ("fc1_latent_proj", "fc2_latent_proj"):
        return "bf16"
    assert part in ("experts", "shared_experts.up_proj", "shared_experts.down_proj")
    return "nvfp4"


def test_super_120b_format_table_matches_spec():
    from latentforge.model import HybridModel
    from latentforge.model.recipes import compose, model_config_from

    cfg = model_config_from(compose(["recipe=super_120b"]))
    assert cfg.layer_pattern == SUPER_PATTERN
    with torch.device("meta"):
        model = HybridModel(cfg)
    table = resolve_policy(model, load_recipe("nvfp4"))
    got = {e.name: e.format for e in table}
    mismatched = {n: (f, _spec_format(n)) for n, f in got.items() if f != _spec_format(n)}
    assert not mismatched
    # every GEMM is listed: 40 Mamba x 2, 8 attention x 4, 40 MoE x (router, 2 latent, experts, 2 shared),
    # embedding, lm_head, MTP (eh_proj, 4 attention, router, 2 latent, experts, 2 shared)
    assert len(got) == 40 * 2 + 8 * 4 + 40 * 6 + 2 + 11
    mamba_q = sum(1 for i, k in enumerate(SUPER_PATTERN[:74]) if k == "M")
    moe_q = sum(1 for i, k in enumerate(SUPER_PATTERN[:74]) if k == "E")
    assert table.counts()["mxfp8"] == mamba_q
    assert table.counts()["nvfp4"] == mamba_q + 3 * moe_q
    assert table.counts()["fp32"] == 41
    text = format_table(table)
    assert text.splitlines()[0] == "precision nvfp4 [Transformer Engine]"
    assert "backbone.layers.1.mixer.experts" in text and "512x(2688x1024, 1024x2688)" in text


# ----------------------------------------------------------------------------------------------
# capability checks (pure)


def test_nvfp4_and_mxfp8_on_h100_are_clear_errors():
    for fmt in ("nvfp4", "mxfp8"):
        with pytest.raises(PrecisionUnsupportedError) as err:
            check_support({fmt, "bf16"}, emulate=False, device_capability=(9, 0), te_available=True)
        msg = str(err.value)
        assert "compute capability >= 10.0" in msg and "9.0" in msg
        assert "precision.emulate=true" in msg and "fp8_current" in msg
    # an FP8 recipe with an MXFP8 override (Mamba out_proj) still needs Blackwell for that override
    table = resolve_policy(ToyModel(), PrecisionConfig(name="fp8_current", mxfp8=["*.out_proj"]))
    with pytest.raises(PrecisionUnsupportedError, match=r"mxfp8 .*MXFP8BlockScaling.*4 modules.*out_proj"):
        check_support(table, emulate=False, device_capability=(9, 0), te_available=True)


def test_fp8_needs_hopper_and_te_needs_installing():
    for fmt in ("fp8_current", "fp8_delayed", "fp8_block"):
        check_support({fmt}, emulate=False, device_capability=(9, 0), te_available=True)
        with pytest.raises(PrecisionUnsupportedError, match=r"9\.0.*8\.0.*emulate=true"):
            check_support({fmt}, emulate=False, device_capability=(8, 0), te_available=True)
        with pytest.raises(PrecisionUnsupportedError, match=r"not installed.*pip install -e \.\[gpu\].*emulate=true"):
            check_support({fmt}, emulate=False, device_capability=(9, 0), te_available=False)
        with pytest.raises(PrecisionUnsupportedError, match="needs a CUDA GPU"):
            check_support({fmt}, emulate=False, device_capability=None, te_available=True)
    check_support({"nvfp4", "mxfp8"}, emulate=False, device_capability=(10, 0), te_available=True)
    check_support({"nvfp4"}, emulate=True, device_capability=None, te_available=False)
    check_support({"bf16", "fp32"}, emulate=False, device_capability=None, te_available=False)


# ----------------------------------------------------------------------------------------------
# application


def test_apply_emulated_keeps_parameters_and_checkpoint():
    model = ToyModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    x = torch.randint(0, 10, (2, 7))
    ref = model(x)
    cfg = PrecisionConfig(name="fp8_current", emulate=True, keep_bf16=["*.q_proj"], mxfp8=["*.out_proj"])
    table = apply_precision(model, cfg)
    assert dict(model.named_parameters()) == params  # the very same Parameter objects, same names
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, EmulatedLinear)}
    assert {n for n, e in table.by_name().items() if e.quantized} == set(swapped)
    assert swapped["backbone.layers.0.mixer.out_proj"].format == "mxfp8"
    assert {e.backend for e in table if e.quantized} == {"emulated"}
    out = model(x)
    assert not torch.equal(out, ref) and (out - ref).norm() / ref.norm() < 0.1
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("mtp."))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_precision(model, cfg)


def test_apply_without_te_names_the_fix():
    model = ToyModel()
    with pytest.raises(PrecisionUnsupportedError, match=r"pip install -e \.\[gpu\]"):
        apply_precision(model, PrecisionConfig(name="fp8_block"), te_available=False)
    assert not any(isinstance(m, EmulatedLinear) for m in model.modules())  # nothing was changed


@pytest.mark.parametrize("name", q.RECIPES)
def test_every_recipe_trains_the_hybrid_model_emulated(name):
    from latentforge.model import HybridModel

    cfg = small_model_config()
    torch.manual_seed(0)
    model = HybridModel(cfg)
    table = apply_precision(model, load_recipe(name, emulate=True, keep_last_layers=1 if name == "nvfp4" else 0))
    experts = [m for n, m in model.named_modules() if n.endswith("mixer.experts")]
    by_name = table.by_name()
    for n, m in model.named_modules():
        if n.endswith("mixer.experts"):
            assert (m.linear_fn is not None) == by_name[n].quantized
    if name != "bf16":
        assert any(e.linear_fn is not None for e in experts)
    inputs, labels = markov_batches(1, 2, 16, cfg.vocab_size)[0]
    out = model_loss(model, inputs, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_emulated_nvfp4_training_follows_bf16_curve():
    """30 steps (the bench runs a few hundred): the tail loss gap stays under 0.05 nats."""
    cfg = small_model_config()
    batches = markov_batches(30, 8, 32, cfg.vocab_size, used_vocab=256)
    base, _ = train_loss_curve(cfg, None, batches)
    nvfp4, _ = train_loss_curve(cfg, load_recipe("nvfp4", emulate=True, keep_last_layers=1), batches)
    assert base[-1] < base[0] - 1.0  # it learns
    assert nvfp4 != base  # the quantization changed the numerics
    gap = tail_mean(nvfp4, 5) - tail_mean(base, 5)
    assert abs(gap) < 0.05, (gap, base[-5:], nvfp4[-5:])


# ----------------------------------------------------------------------------------------------
# Transformer Engine path (GPU only)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8_current", "fp8_delayed", "fp8_block", "mxfp8", "nvfp4"])
def test_te_linears_match_emulation(name):
    te = pytest.importorskip("transformer_engine.pytorch")
    cap = torch.cuda.get_device_capability()
    if name in ("mxfp8", "nvfp4") and cap < (10, 0):
        pytest.skip(f"{name} needs compute capability 10.0")
    model = ToyModel().cuda().bfloat16()
    emulated = ToyModel().cuda().bfloat16()
    emulated.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    table = apply_precision(model, PrecisionConfig(name=name, nvfp4_stochastic_rounding=False))
    apply_precision(emulated, PrecisionConfig(name=name, emulate=True, nvfp4_stochastic_rounding=False))
    assert {e.backend for e in table if e.quantized} == {"te"}
    assert isinstance(model.get_submodule("backbone.layers.0.mixer.in_proj"), te.Linear)
    assert [k for k in model.state_dict() if not k.endswith("_extra_state")] == keys
    x = torch.randint(0, 10, (4, 32), device="cuda")
    out, ref = model(x), emulated(x)
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 0.02
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
