"""The runner in a single process (no process group) against the plain model, plus the pure helpers of the
parallel layer (expert regrouping, Mamba row split, context-parallel mask)."""

import copy

import pytest
import torch

from latentforge.model import HybridModel
from latentforge.model.attention import document_causal_mask
from latentforge.model.mamba import Mamba2Mixer
from latentforge.train.parallel import ParallelConfig, build_runner
from latentforge.train.parallel.expert_parallel import _regroup
from latentforge.train.parallel.cp_attention import _BlockMask
from latentforge.train.parallel.tensor_parallel import rank_major_order, rank_rows
from latentforge.train.parallel.token_order import TokenOrder

from .loss_reference import reference_loss
from .test_parallel_common import global_batches, one_thread, tiny_config

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _max_relative(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def test_single_process_step_is_the_model_loss_and_gradient():
    cfg = tiny_config()  # two MTP depths: the shared MTP MoE's balance loss and load count at both
    torch.manual_seed(0)
    model = HybridModel(cfg)
    plain = copy.deepcopy(model)
    batch = global_batches(cfg, steps=1)[0]
    runner = build_runner(model, cfg, ParallelConfig())
    assert runner.model_parts == [model] and runner.dp_size == 1 and runner.is_metrics_rank
    result = runner.forward_backward([batch])
    out = reference_loss(plain, batch["input_ids"], batch["labels"], seq_idx=batch["seq_idx"])
    out.loss.backward()
    assert result["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    assert result["lm_loss"] == pytest.approx(out.lm_loss.item(), rel=1e-6)
    assert result["mtp_losses"] == pytest.approx([x.item() for x in out.mtp_losses], rel=1e-6)
    assert result["aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-6)
    assert result["tokens"] == float((batch["labels"] != -100).sum())
    assert torch.equal(result["expert_load"], out.expert_load)
    # the reference is an independent computation (whole logits, F.cross_entropy) rounding differently in fp32:
    # 1.3e-6 under ATEN_CPU_CAPABILITY=default, so the layout tests' gradient tolerance
    assert _max_relative(_grads(model), _grads(plain)) < 1e-5


def test_micro_batches_sum_to_the_global_batch_step():
    cfg = tiny_config()
    torch.manual_seed(0)
    whole = HybridModel(cfg)
    split = copy.deepcopy(whole)
    batch = global_batches(cfg, steps=1)[0]
    r1 = build_runner(whole, cfg, ParallelConfig())
    r2 = build_runner(split, cfg, ParallelConfig())
    one = r1.forward_backward([batch])
    pieces = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    four = r2.forward_backward(pieces)
    for key in ("loss", "lm_loss", "aux_loss"):
        assert four[key] == pytest.approx(one[key], rel=1e-6)
    assert torch.equal(four["expert_load"], one["expert_load"])
    assert _max_relative(_grads(split), _grads(whole)) < 1e-5
    # every trunk MoE layer routes each token top_k times; the MTP MoE layer once per depth
    tokens = batch["input_ids"].numel()
    assert one["expert_load"].sum(1).tolist() == [tokens * cfg.top_k] * 2 + [tokens * cfg.top_k * cfg.mtp_depths]


def test_clip_grad_norm_is_the_exact_global_norm():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = HybridModel(cfg)
    runner = build_runner(model, cfg, ParallelConfig())
    runner.forward_backward(global_batches(cfg, steps=1))
    grads = _grads(model)
    exact = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())).item()
    assert runner.clip_grad_norm_(float("inf")) == pytest.approx(exact, rel=1e-12)
    assert runner.clip_grad_norm_(exact / 4) == pytest.approx(exact, rel=1e-12)
    clipped = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()
    assert clipped == pytest.approx(exact / 4, rel=1e-5)


def test_activation_checkpointing_gives_the_same_step():
    cfg = tiny_config()
    torch.manual_seed(0)
    plain = HybridModel(cfg)
    recomputed = copy.deepcopy(plain)
    batches = global_batches(cfg, steps=1)
    a = build_runner(plain, cfg, ParallelConfig()).forward_backward(batches)
    b = build_runner(recomputed, cfg, ParallelConfig(activation_checkpoint="all")).forward_backward(batches)
    assert a["loss"] == b["loss"] and torch.equal(a["expert_load"], b["expert_load"])
    assert _max_relative(_grads(recomputed), _grads(plain)) < 1e-6


def test_expert_bias_update_matches_the_model():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = HybridModel(cfg)
    plain = copy.deepcopy(model)
    runner = build_runner(model, cfg, ParallelConfig())
    load = torch.randint(0, 50, (len(model.moe_layers()), cfg.num_experts))
    runner.update_expert_bias(load)
    plain.update_expert_bias(load)
    for a, b in zip(model.moe_layers(), plain.moe_layers()):
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)
        assert a.gate.e_score_correction_bias.abs().sum() > 0


def test_regroup_orders_rows_by_expert_then_source_with_padding():
    received = torch.tensor([[2, 0, 1], [1, 3, 0]])  # [source rank, local expert]
    destination, padded, rows = _regroup(received, alignment=4)
    assert padded.tolist() == [4, 4, 4] and rows == 12
    # arrival order: src0 -> e0 e0 e2, src1 -> e0 e1 e1 e1
    assert destination.tolist() == [0, 1, 8, 2, 4, 5, 6]
    destination, padded, rows = _regroup(received, alignment=1)
    assert destination.tolist() == [0, 1, 6, 2, 3, 4, 5] and rows == 7


def test_mamba_rows_pick_each_ranks_heads_and_groups():
    cfg = tiny_config()
    mixer = Mamba2Mixer(cfg)
    di, gn, nh = cfg.mamba_d_inner, cfg.mamba_groups * cfg.ssm_state_size, cfg.mamba_num_heads
    assert mixer.in_proj_blocks() == [di, di, gn, gn, nh] and sum(mixer.in_proj_blocks()) == cfg.mamba_in_proj_size
    weight = torch.arange(cfg.mamba_in_proj_size)
    z, x, B, C, dt = weight.split([di, di, gn, gn, nh])
    xbc = torch.arange(di + 2 * gn)
    cx, cB, cC = xbc.split([di, gn, gn])
    mine = []
    for rank in range(2):
        half = lambda t: t.chunk(2)[rank]  # noqa: E731
        mine.append(torch.cat([half(z), half(x), half(B), half(C), half(dt)]))
        assert torch.equal(weight[rank_rows(mixer.in_proj_blocks(), 2, rank)], mine[-1])
        assert torch.equal(xbc[rank_rows(mixer.conv_blocks(), 2, rank)], torch.cat([half(cx), half(cB), half(cC)]))
    # rank-contiguous storage: Shard(0) of the stored rows is exactly each rank's rows
    assert torch.equal(weight[rank_major_order(mixer.in_proj_blocks(), 2)], torch.cat(mine))


def test_context_parallel_block_masks_are_slices_of_the_full_mask():
    """Each rank's (query block, key block) mask, in the load-balanced token order, is the matching piece of the
    single-process document-causal mask."""
    seq = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    full = document_causal_mask(seq)[:, 0]
    order = TokenOrder.choose(16, cp=2, load_balance=True)
    keys = order.all_positions()
    for rank in range(2):
        queries = order.positions(rank)
        mask = _BlockMask(queries, keys, seq[:, queries], seq[:, keys])
        for q0, q1, k0, k1 in ((0, 8, 0, 16), (2, 5, 3, 11)):
            want = full[:, queries[q0:q1]][:, :, keys[k0:k1]]
            assert torch.equal(mask(q0, q1, k0, k1)[:, 0, 0], want)


def _meta_runner(cfg, **parallel):
    torch.manual_seed(5)
    with torch.device("meta"):
        model = HybridModel(cfg)
    return model, build_runner(model, cfg, ParallelConfig(**parallel))


def test_meta_built_model_is_initialised_by_the_runner():
    cfg = tiny_config()
    model, runner = _meta_runner(cfg)
    again, _ = _meta_runner(cfg)
    with torch.no_grad():
        _check_initialisation(model, again, cfg)
    result = runner.forward_backward(global_batches(cfg, steps=1))
    assert abs(result["lm_loss"] - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 0.5


def _check_initialisation(model, again, cfg):
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert not p.is_meta and torch.isfinite(p).all(), name
        assert torch.equal(p, q), name  # the same seed gives the same model
    backbone = model.backbone
    assert float(backbone.embeddings.weight.std()) == pytest.approx(cfg.init_std, rel=0.05)
    mamba = backbone.layers[0].mixer
    assert torch.equal(mamba.D, torch.ones_like(mamba.D)) and torch.equal(
        backbone.norm_f.weight, torch.ones_like(backbone.norm_f.weight)
    )
    assert bool(((mamba.A_log.exp() >= 1) & (mamba.A_log.exp() <= 16)).all())
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    assert float(mamba.out_proj.weight.std()) == pytest.approx(out_std, rel=0.1)
    for moe in model.moe_layers():
        assert torch.equal(moe.gate.e_score_correction_bias, torch.zeros_like(moe.gate.e_score_correction_bias))


def test_partly_meta_model_is_refused():
    cfg = tiny_config()
    with torch.device("meta"):
        model = HybridModel(cfg)
    model.lm_head.to_empty(device="cpu")
    with pytest.raises(ValueError, match="partly on the meta device"):
        build_runner(model, cfg, ParallelConfig())


def _padded(batch: dict, extra: int, extra_rows: int = 0) -> dict:
    """`batch` with `extra` padding positions per row and `extra_rows` all-padding rows (attention_mask 0 there,
    labels ignored), as a GRPO or SFT batch padded for a layout carries."""
    b, s = batch["input_ids"].shape
    out = {}
    for key, fill in (("input_ids", 0), ("labels", -100), ("seq_idx", 0)):
        value = batch[key]
        grown = torch.full((b + extra_rows, s + extra), fill, dtype=value.dtype)
        grown[:b, :s] = value
        if key == "seq_idx":
            grown[:b, s:] = value[:, -1:]
        out[key] = grown
    out["attention_mask"] = torch.zeros(b + extra_rows, s + extra, dtype=torch.bool)
    out["attention_mask"][:b, :s] = True
    return out


def test_padding_with_attention_mask_changes_nothing():
    """Padded positions and rows (attention_mask 0) count in no loss, balance loss, expert load or gradient."""
    cfg = tiny_config()
    batch = global_batches(cfg, steps=1)[0]

    def step(batches):
        torch.manual_seed(0)
        model = HybridModel(cfg)
        result = build_runner(model, cfg, ParallelConfig()).forward_backward(batches)
        return result, _grads(model)

    plain, plain_grads = step([batch])
    padded, padded_grads = step([_padded(batch, extra=16, extra_rows=2)])
    for key in ("loss", "lm_loss", "aux_loss"):
        assert padded[key] == pytest.approx(plain[key], rel=1e-6), key
    assert torch.equal(padded["expert_load"], plain["expert_load"])
    assert _max_relative(padded_grads, plain_grads) < 1e-5
    unmasked = _padded(batch, extra=16, extra_rows=2)
    del unmasked["attention_mask"]
    counted, _ = step([unmasked])  # without the mask the padding is routed and balanced like real tokens
    assert not torch.equal(counted["expert_load"], plain["expert_load"])
