"""Layout validation and stage cutting: pure functions, no processes."""

import pytest

from latentforge.model import ModelConfig
from latentforge.train.parallel import LayoutError, ParallelConfig, split_stages, validate_layout
from latentforge.train.parallel.pipeline import balance

from .test_parallel_common import tiny_config


def check(pc, world=8, model=None, **kwargs):
    return validate_layout(model or tiny_config(), pc, world, **kwargs)


def test_dp_shard_fills_the_world():
    layout = check(ParallelConfig(tp=2, pp=2), world=16)
    assert (layout.pp, layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp) == (2, 1, 4, 1, 2)
    assert layout.dp == 4


@pytest.mark.parametrize(
    "pc, world, words",
    [
        (ParallelConfig(tp=3), 8, ["world size 8", "tp (3)", "multiple of 3"]),
        (ParallelConfig(tp=2, dp_shard=2), 8, ["world size 8", "dp_shard (2)", "4 processes"]),
        (ParallelConfig(dp_shard=0), 2, ["dp_shard", "-1"]),
        (ParallelConfig(pp=0), 2, ["parallel.pp", "positive"]),
    ],
)
def test_world_size_mismatch_names_the_sizes(pc, world, words):
    with pytest.raises(LayoutError) as err:
        check(pc, world)
    for word in words:
        assert word in str(err.value)


NO_ATTENTION = dict(pattern="ME-", mtp_depths=0)


@pytest.mark.parametrize(
    "overrides, tp, words",
    [
        (dict(num_key_value_heads=1), 2, ["tp (2)", "num_key_value_heads (1)", "kv-head"]),
        (dict(mamba_groups=1), 2, ["tp (2)", "mamba_groups (1)"]),
        (dict(mamba_num_heads=6, **NO_ATTENTION), 4, ["tp (4)", "mamba_num_heads (6)", "split by heads"]),
        (
            dict(shared_expert_intermediate_size=100, pattern="E-", mtp_depths=0),
            8,
            ["shared_expert_intermediate_size (100)"],
        ),
    ],
)
def test_tensor_parallel_must_divide_the_model(overrides, tp, words):
    cfg = tiny_config(**overrides)
    with pytest.raises(LayoutError) as err:
        check(ParallelConfig(tp=tp), world=tp, model=cfg)
    for word in words:
        assert word in str(err.value)


def test_sequence_parallel_off_is_refused_with_tp():
    with pytest.raises(LayoutError, match="sequence_parallel"):
        check(ParallelConfig(tp=2, sequence_parallel=False), world=2)


@pytest.mark.parametrize(
    "pc, world, words",
    [
        (ParallelConfig(ep=3), 6, ["ep (3)", "num_experts (8)"]),
        (ParallelConfig(ep=4), 2, ["ep / cp", "dp_shard (2)"]),
        (ParallelConfig(ep=2, cp=4), 8, ["multiple of parallel.cp (4)"]),
    ],
)
def test_expert_parallel_checks(pc, world, words):
    with pytest.raises(LayoutError) as err:
        check(pc, world)
    for word in words:
        assert word in str(err.value)


def test_expert_parallel_without_moe_layers():
    cfg = tiny_config(pattern="M*-", mtp_depths=0)
    with pytest.raises(LayoutError, match="no MoE layer"):
        check(ParallelConfig(ep=2), world=2, model=cfg)


def test_expert_parallel_carved_from_data_and_context_parallel():
    layout = check(ParallelConfig(ep=4, cp=2), world=8)
    assert (layout.dp_shard, layout.dp_shard_in_ep, layout.dp_shard_mod_ep) == (4, 2, 2)


def test_pipeline_checks():
    with pytest.raises(LayoutError, match="6 layers, fewer than pp \\(4\\) x pp_virtual_stages \\(2\\) = 8"):
        check(ParallelConfig(pp=4, pp_virtual_stages=2, pp_schedule="interleaved_1f1b"), world=4)
    with pytest.raises(LayoutError, match="pp_virtual_stages >= 2"):
        check(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), world=2)
    with pytest.raises(LayoutError, match="needs pp_schedule=interleaved_1f1b"):
        check(ParallelConfig(pp=2, pp_virtual_stages=2), world=2)
    with pytest.raises(LayoutError, match="pp_schedule must be one of"):
        check(ParallelConfig(pp=2, pp_schedule="zigzag"), world=2)
    with pytest.raises(LayoutError, match="1 micro-batch\\(es\\) per step .* fewer than pp \\(2\\)"):
        check(ParallelConfig(pp=2), world=2, num_microbatches=1)
    cut = tiny_config(pattern="MEM|*E-")
    with pytest.raises(LayoutError, match="1 '\\|' cut\\(s\\) = 2 stages, but pp \\(4\\)"):
        check(ParallelConfig(pp=4), world=4, model=cut)


def test_context_parallel_sequence_checks():
    with pytest.raises(LayoutError, match="sequence length 62 must be divisible by cp \\(2\\) x tp \\(2\\) = 4"):
        check(ParallelConfig(cp=2, tp=2), world=4, seq_len=62)
    with pytest.raises(LayoutError, match="multiple of model.chunk_size \\(16\\)"):
        check(ParallelConfig(cp=2), world=2, seq_len=40)
    check(ParallelConfig(cp=2, tp=2), world=4, seq_len=64)


def test_activation_checkpoint_kinds():
    assert ParallelConfig(activation_checkpoint="all").checkpointed_kinds() >= {"mamba", "attention", "moe", "mtp"}
    assert ParallelConfig(activation_checkpoint=["moe"]).checkpointed_kinds() == {"moe"}
    with pytest.raises(LayoutError, match="unknown kind"):
        check(ParallelConfig(activation_checkpoint=["ssm"]), world=1)


def test_unknown_parallel_keys_are_named():
    with pytest.raises(LayoutError, match="unknown parallel config key\\(s\\) \\['tensor_parallel'\\]"):
        ParallelConfig.from_dict({"tensor_parallel": 2})


def test_pattern_cuts_define_the_stages():
    cfg = tiny_config(pattern="ME|M*|E-")
    assert split_stages(cfg, 3) == [[0, 1], [2, 3], [4, 5]]


def test_balance_minimises_the_largest_stage_against_brute_force():
    import itertools

    costs = [5.0, 1.0, 1.0, 7.0, 2.0, 2.0, 3.0, 1.0]
    for stages in (2, 3, 4):
        for tail in (0.0, 6.0):
            starts = balance(costs, stages, tail)

            def worst(cuts):
                bounds = [0, *cuts, len(costs)]
                parts = [sum(costs[bounds[i] : bounds[i + 1]]) for i in range(stages)]
                parts[-1] += tail
                return max(parts)

            best = min(worst(c) for c in itertools.combinations(range(1, len(costs)), stages - 1))
            assert starts[0] == 0 and len(starts) == stages
            assert worst(starts[1:]) == best


def test_cost_model_keeps_the_heads_stage_lighter():
    cfg = ModelConfig(
        pattern="M" * 8,
        hidden_size=64,
        vocab_size=4096,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_groups=1,
        mtp_depths=0,
    )
    first, second = split_stages(cfg, 2)
    assert len(first) > len(second)  # the last stage also runs the lm_head
    assert first + second == list(range(8))


def test_super_120b_published_layout_validates():
    from latentforge.model.recipes import compose, model_config_from

    cfg = compose(["recipe=super_120b", "parallel=super_64xh100"])
    pc = ParallelConfig.from_dict(cfg.parallel)
    layout = validate_layout(model_config_from(cfg), pc, 64, seq_len=4096, num_microbatches=8)
    assert (layout.tp, layout.pp, layout.ep, layout.dp_shard) == (1, 2, 32, 32)
    assert sum(len(s) for s in layout.stage_layers) == 88


def test_plan_counts_every_parameter_once_and_shards_per_gpu():
    from latentforge.model.params import count_parameters, meta_model
    from latentforge.train.parallel import format_plan, layout_plan

    cfg = tiny_config()
    total = count_parameters(meta_model(cfg)).total
    _, single = layout_plan(cfg, ParallelConfig(), 1)
    assert single[0].parameters == total and single[0].parameters_per_gpu == total
    layout, plans = layout_plan(cfg, ParallelConfig(pp=2, dp_shard=2), 4)
    copy = cfg.vocab_size * cfg.hidden_size  # the last stage's embedding copy for the MTP block
    assert sum(p.parameters for p in plans) == total + copy
    bias = cfg.num_experts * (cfg.count("moe") + 1)  # expert-bias buffers stay whole on every rank
    assert sum(p.parameters_per_gpu for p in plans) == pytest.approx((total + copy - bias) / 2 + bias)
    assert "pp rank 1" in format_plan(layout, plans)
    _, ep = layout_plan(cfg, ParallelConfig(ep=2, dp_shard=2), 2)
    experts = ep[0].expert_parameters
    assert ep[0].parameters_per_gpu == pytest.approx((total - experts - bias) / 2 + experts / 2 + bias)


def test_plan_of_super_120b_on_64_h100():
    from latentforge.model.recipes import compose, model_config_from
    from latentforge.train.parallel import layout_plan

    cfg = compose(["recipe=super_120b", "parallel=super_64xh100"])
    model_cfg = model_config_from(cfg)
    layout, plans = layout_plan(model_cfg, ParallelConfig.from_dict(cfg.parallel), 64)
    copy = model_cfg.vocab_size * model_cfg.hidden_size if layout.pp > 1 else 0  # the last stage's for MTP
    assert sum(p.parameters for p in plans) == 123_611_033_088 + copy  # SPEC section 2, with MTP
    assert all(p.parameters_per_gpu * 16 < 80 * 2**30 for p in plans)  # weights + AdamW fit an 80 GB H100
