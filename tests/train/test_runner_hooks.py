"""The runner's loss hook (`forward_backward(micro_batches, loss_fn)`) and forward-only `evaluate`.

A custom loss that uses every piece the hook hands over (the final hidden state and lm_head weight, per-token
extra tensors sliced like input_ids, a pass-through value, the MTP block on detached inputs with the carried
embeddings and shifted labels) gives the single-process loss, statistics, gradients and parameters after an AdamW
step (float32, 1e-5 relative) under TP, PP, CP, EP and FSDP; `evaluate` gives forward_backward's numbers without
touching any gradient.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from latentforge.kernels.cross_entropy import linear_cross_entropy
from tests.distributed import run_distributed

from .test_parallel_common import (
    GLOBAL_BATCH,
    assert_same_training,
    full_grads,
    full_state,
    global_batches,
    micro_batches_for,
    one_thread,
    portable,
    restore,
    tiny_config,
)

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

MTP_WEIGHT = 0.3
SCALE = 0.5  # a non-tensor micro-batch value: passes to the hook unchanged


class WeightedLogprobLoss:
    """-sum(w_t log p(label_t)) / W over the global batch, plus MTP cross-entropy on detached trunk features
    (trains the MTP block only) / the global target count. Linear over tokens, so each rank returns its share."""

    def __init__(self, total_weight: float, total_targets: float):
        self.total_weight, self.total_targets = total_weight, total_targets

    def __call__(self, out, mb):
        assert mb["scale"] == SCALE and mb["weights"].shape == mb["labels"].shape == out.hidden.shape[:2]
        labels = mb["labels"]
        valid = labels != -100
        logits = F.linear(out.hidden, out.lm_head_weight).float()
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logp = logp * valid
        weights = mb["weights"] * valid * mb["scale"]
        loss = -(weights * logp).sum() / self.total_weight
        head, mtp_ce = out.lm_head_weight.detach(), 0.0
        for hidden, shifted in zip(out.mtp_hidden(detach=True), out.mtp_labels):  # the MTP block on detached inputs
            mtp_ce = mtp_ce + linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), head, shifted.reshape(-1), reduction="sum"
            )
        loss = loss + MTP_WEIGHT * mtp_ce / self.total_targets
        stats = {
            "targets": valid.sum(),
            "weighted_logp_sum": (weights * logp).sum().detach(),
            "mtp_ce_sum": mtp_ce.detach(),
            "logp_max": logp.masked_fill(~valid, -1e9).max().detach(),
        }
        return loss, stats


def hook_batch(cfg):
    batch = global_batches(cfg, steps=1)[0]
    g = torch.Generator().manual_seed(7)
    batch["weights"] = torch.rand(batch["input_ids"].shape, generator=g)
    return batch


def hook_loss(batch) -> WeightedLogprobLoss:
    valid = batch["labels"] != -100
    return WeightedLogprobLoss(float((batch["weights"] * valid).sum() * SCALE), float(valid.sum()))


def hook_run(parallel: dict, micro_batch_size: int):
    """evaluate (both modes), then one forward_backward with the hook, clip and AdamW step."""
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner

    cfg = tiny_config()
    torch.manual_seed(0)
    runner = build_runner(HybridModel(cfg), cfg, ParallelConfig(**parallel))
    batch = hook_batch(cfg)
    loss_fn = hook_loss(batch)
    micro = [dict(mb, scale=SCALE) for mb in micro_batches_for(batch, runner.dp_rank, runner.dp_size, micro_batch_size)]
    params = [p for part in runner.model_parts for p in part.parameters()]
    lm_eval = runner.evaluate(micro)  # the pretraining losses, forward only
    evaluated = runner.evaluate(micro, loss_fn)
    untouched = all(p.grad is None for p in params)
    result = runner.forward_backward(micro, loss_fn)
    grads = full_grads(runner.model_parts)
    result["grad_norm"] = runner.clip_grad_norm_(1.0)
    # AdamW's first step is lr * g / (|g| + eps): with eps = 1 it is ~g, so the parameters compare the (clipped)
    # gradients; with a tiny eps, float noise in near-zero gradients would become +-lr
    optimizer = torch.optim.AdamW(params, lr=1.0, eps=1.0, weight_decay=0.1, foreach=False)
    optimizer.step()
    state = {**full_state(runner.model_parts), **grads}
    groups = runner.groups
    owner = groups.mesh is None or (groups.dp_rank == 0 and groups.cp_rank == 0 and groups.tp_rank == 0)
    for r in (result, evaluated):  # the shape assert_same_training reads
        r["lm_loss"], r["mtp_losses"] = r["loss"], []
    return portable(([result], (state if owner else None), evaluated, lm_eval, untouched))


def _worker(rank, world_size, layouts):
    # every layout of this world size in one launch of the ranks: a launch costs seconds on 2 CPU cores, and each
    # hook_run builds its own runner from seed 0
    return {name: hook_run(parallel, micro_batch_size) for name, (parallel, micro_batch_size) in layouts.items()}


_REFERENCE = []


def reference():
    if not _REFERENCE:
        _REFERENCE.append(hook_run({}, GLOBAL_BATCH))
    return _REFERENCE[0]


def _check_against_reference(results):
    history, state, evaluated, lm_eval, untouched = restore(reference())
    assert untouched
    assert_same_training((history, state), [(r[0], r[1]) for r in results])
    want = history[0]["stats"]
    for rank_result in restore(results):
        got_history, _, got_eval, got_lm_eval, got_untouched = rank_result
        got = got_history[0]
        assert got_untouched, "evaluate() left a gradient"
        assert sorted(got["stats"]) == sorted(want)
        for key, value in want.items():
            assert got["stats"][key] == pytest.approx(value, rel=1e-5), key
        # evaluate = forward_backward's numbers; the pretraining losses too
        assert got_eval["loss"] == pytest.approx(got["loss"], rel=1e-6)
        assert got_eval["stats"] == pytest.approx(got["stats"], rel=1e-6)
        for key in ("loss", "lm_loss", "aux_loss"):
            assert got_lm_eval[key] == pytest.approx(lm_eval[key], rel=1e-5), key
        assert got_lm_eval["mtp_losses"] == pytest.approx(lm_eval["mtp_losses"], rel=1e-5)
    assert evaluated["loss"] == pytest.approx(history[0]["loss"], rel=1e-6)


LAYOUTS = {
    # name: (parallel config, world size, micro-batch size per data-parallel rank)
    "tp2": (dict(tp=2), 2, 2),
    "pp2": (dict(pp=2), 2, 1),
    "cp2": (dict(cp=2), 2, 2),
    "ep2": (dict(ep=2), 2, 1),
    "fsdp2": (dict(dp_shard=2), 2, 1),
}


def test_loss_hook_matches_single_process_on_each_two_rank_layout():
    layouts = {name: (parallel, micro_batch_size) for name, (parallel, world, micro_batch_size) in LAYOUTS.items()}
    assert {world for _, world, _ in LAYOUTS.values()} == {2}
    per_rank = run_distributed(_worker, 2, layouts, timeout=600)
    for name in LAYOUTS:
        try:
            _check_against_reference([by_layout[name] for by_layout in per_rank])
        except AssertionError as error:
            raise AssertionError(f"layout {name}: {error}") from error


def test_single_process_hook_and_evaluate():
    """World of one: the hook's loss and stats are those of the plain model; evaluate() = forward_backward()."""
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner

    cfg = tiny_config(moe_aux_loss_coeff=0.0)  # the balance loss would add its own trunk gradient
    torch.manual_seed(0)
    model = HybridModel(cfg)
    plain, policy_only = copy.deepcopy(model), copy.deepcopy(model)
    runner = build_runner(model, cfg, ParallelConfig())
    batch = hook_batch(cfg)
    loss_fn = hook_loss(batch)
    micro = [dict(mb, scale=SCALE) for mb in micro_batches_for(batch, 0, 1, 2)]
    evaluated = runner.evaluate(micro, loss_fn)
    assert all(p.grad is None for p in model.parameters())
    result = runner.forward_backward(micro, loss_fn)
    assert result["lm_loss"] is None and result["mtp_losses"] == [] and result["tokens"] > 0
    for key in ("loss", "aux_loss", "tokens"):
        assert evaluated[key] == pytest.approx(result[key], rel=1e-6), key
    assert evaluated["stats"] == pytest.approx(result["stats"], rel=1e-6)
    assert torch.equal(evaluated["expert_load"], result["expert_load"])

    out = plain(batch["input_ids"], seq_idx=batch["seq_idx"])  # the hook's policy term, by hand
    valid = batch["labels"] != -100
    logp = torch.log_softmax(out.logits.float(), -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    weighted = (batch["weights"] * valid * SCALE * logp * valid).sum()
    assert result["stats"]["weighted_logp_sum"] == pytest.approx(weighted.item(), rel=1e-5)
    assert result["stats"]["targets"] == valid.sum().item() == result["tokens"]
    assert result["stats"]["logp_max"] == pytest.approx(logp[valid].max().item(), rel=1e-5)
    assert result["loss"] == pytest.approx(
        -weighted.item() / loss_fn.total_weight
        + MTP_WEIGHT * result["stats"]["mtp_ce_sum"] / loss_fn.total_targets
        + cfg.moe_aux_loss_coeff * result["aux_loss"],
        rel=1e-5,
    )
    # the MTP term saw detached trunk features: the embedding's gradient is the policy term's alone
    out = policy_only(batch["input_ids"], seq_idx=batch["seq_idx"])
    logp = torch.log_softmax(out.logits.float(), -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    (-(batch["weights"] * valid * SCALE * logp * valid).sum() / loss_fn.total_weight).backward()
    embed = policy_only.backbone.embeddings.weight.grad
    assert float((model.backbone.embeddings.weight.grad - embed).norm() / embed.norm()) < 1e-4


def test_hook_errors_are_clear():
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner

    cfg = tiny_config()
    torch.manual_seed(0)
    runner = build_runner(HybridModel(cfg), cfg, ParallelConfig())
    batch = hook_batch(cfg)
    no_labels = [{"input_ids": batch["input_ids"][:1]}]
    with pytest.raises(KeyError, match="needs 'input_ids' and 'labels'"):
        runner.forward_backward(no_labels)
    with pytest.raises(TypeError, match=r"must return \(loss, stats\)"):
        runner.forward_backward(no_labels, lambda o, mb: o.hidden.sum())
    with pytest.raises(TypeError, match="one-element tensor"):
        runner.evaluate(no_labels, lambda o, mb: (o.hidden, {}))
    with pytest.raises(ValueError, match="single number"):
        runner.evaluate(no_labels, lambda o, mb: (o.hidden.sum(), {"bad": o.hidden[0, :2, 0]}))
    # labels are optional with a hook: nothing is a target
    result = runner.evaluate(no_labels, lambda o, mb: (o.hidden.float().pow(2).mean(), {"n": o.hidden.shape[1]}))
    assert result["tokens"] == 0 and result["stats"] == {"n": batch["input_ids"].shape[1]}
