"""Shared pieces of the parallel tests (no tests here): the tiny model, deterministic global batches, a training
run through `build_runner`, and the comparison of gathered parameters against the single-process run.

`train_run(layout, ...)` runs in each spawned process (and in-process for world 1): it builds the same model from
the same seed, takes this rank's data-parallel share of each global batch, runs two AdamW steps with grad clipping
and the expert-bias update, and returns the per-step results plus the full (gathered) parameters and buffers of
the stages it owns (from one rank per stage, to keep the traffic small).
"""

from __future__ import annotations

import warnings

import torch

TINY = dict(
    pattern="MEM*E-",
    hidden_size=128,
    vocab_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    mamba_num_heads=8,
    mamba_head_dim=32,
    mamba_groups=2,
    ssm_state_size=32,
    conv_kernel=4,
    chunk_size=16,
    num_experts=8,
    top_k=2,
    moe_intermediate_size=64,
    moe_latent_size=64,
    shared_expert_intermediate_size=128,
    routed_scaling_factor=2.5,
    mlp_intermediate_size=256,
    mtp_depths=2,
    mtp_loss_weight=0.3,
    init_std=0.02,
)
SEQ_LEN = 64
GLOBAL_BATCH = 4
STEPS = 2


def tiny_config(**overrides):
    from latentforge.model import ModelConfig

    return ModelConfig(**{**TINY, **overrides})


def global_batches(cfg, steps=STEPS, batch=GLOBAL_BATCH, seq_len=SEQ_LEN, seed=1234):
    """Packed documents with resets inside CP/TP pieces and exactly at piece boundaries, and ignored labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        seq = torch.zeros(batch, seq_len, dtype=torch.int32)
        for row in range(batch):
            cuts = sorted(torch.randint(1, seq_len, (row % 3,), generator=g).tolist())
            if row == 1:
                cuts = sorted(set(cuts + [seq_len // 2]))  # a document starting exactly at a CP boundary
            for c in cuts:
                seq[row, c:] += 1
            for c in cuts:
                labels[row, c - 1] = -100  # no target across documents
        labels[0, 5:9] = -100
        out.append({"input_ids": ids, "labels": labels, "seq_idx": seq})
    return out


def micro_batches_for(batch: dict, dp_rank: int, dp_size: int, micro_batch_size: int) -> list:
    """This DP rank's share of a global batch, cut into micro-batches."""
    per_rank = batch["input_ids"].shape[0] // dp_size
    start = dp_rank * per_rank
    mine = {k: v[start : start + per_rank] for k, v in batch.items()}
    return [{k: v[i : i + micro_batch_size] for k, v in mine.items()} for i in range(0, per_rank, micro_batch_size)]


def _full(value):
    from torch.distributed.tensor import DTensor

    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()


def full_state(parts: list) -> dict:
    """Every parameter and buffer of `parts` as a full tensor (DTensors gathered: a collective, on all ranks)."""
    return {name: _full(value) for part in parts for name, value in part.state_dict().items()}


def full_grads(parts: list) -> dict:
    """Every gradient as a full tensor in the model's natural layout (Mamba's TP storage is rank-contiguous)."""
    from latentforge.train.parallel.tensor_parallel import natural_gradients

    return {"grad:" + name: _full(g) for part in parts for name, g in natural_gradients(part).items()}


def train_run(
    parallel: dict,
    micro_batch_size: int = 2,
    model_overrides=None,
    lr: float = 1e-3,
    checkpoint_dir=None,
    meta: bool = False,
):
    """Build, run STEPS optimizer steps, return (per-step results, full state of owned stages or None).

    With `checkpoint_dir`, the final model is also saved there with torch.distributed.checkpoint. With `meta`, the
    model is built on the meta device and initialised by the runner, unit by unit."""
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner

    cfg = tiny_config(**(model_overrides or {}))
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = HybridModel(cfg)
    else:
        model = HybridModel(cfg)
    runner = build_runner(model, cfg, ParallelConfig(**parallel))
    params = [p for part in runner.model_parts for p in part.parameters()]
    initial = {"init:" + k: v for k, v in full_state(runner.model_parts).items()}  # for update-relative errors
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, foreach=False)
    history, first_grads = [], None
    for batch in global_batches(cfg):
        optimizer.zero_grad()
        result = runner.forward_backward(micro_batches_for(batch, runner.dp_rank, runner.dp_size, micro_batch_size))
        if first_grads is None:
            first_grads = full_grads(runner.model_parts)  # the first step's gradients, before clipping
        result["grad_norm"] = runner.clip_grad_norm_(1.0)
        optimizer.step()
        runner.update_expert_bias(result["expert_load"])
        history.append(result)
    if checkpoint_dir is not None:
        save_checkpoint(runner.model_parts, checkpoint_dir)
    state = {**full_state(runner.model_parts), **first_grads, **initial}
    groups = runner.groups
    owner = groups.mesh is None or (groups.dp_rank == 0 and groups.cp_rank == 0 and groups.tp_rank == 0)
    return portable((history, (state if owner else None)))


def portable(value):
    """Tensors -> numpy arrays (a spawned process's shared-memory tensors die with it); `restore` undoes it."""
    if isinstance(value, torch.Tensor):
        return ("__tensor__", value.detach().cpu().numpy())
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v) for v in value)
    return value


def restore(value):
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__tensor__":
        return torch.from_numpy(value[1])
    if isinstance(value, dict):
        return {k: restore(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(restore(v) for v in value)
    return value


def save_checkpoint(parts: list, path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {}
    for part in parts:
        state.update(get_model_state_dict(part))
    dcp.save(state, checkpoint_id=str(path))


def load_unsharded(path, **model_overrides):
    """A fresh single-process model (other seed) loaded from a DCP checkpoint of any layout."""
    import torch.distributed.checkpoint as dcp

    from latentforge.model import HybridModel

    torch.manual_seed(99)
    model = HybridModel(tiny_config(**model_overrides))
    state = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state)
    return model


def merged_states(results: list) -> dict:
    merged = {}
    for _, state in results:
        if state:
            merged.update(state)
    return merged


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_training(reference, results, tol=1e-5, update_tol=1e-3):
    """Per-step losses, grad norms and expert loads, the first step's gradients, then every parameter and buffer
    after the last step, against the reference.

    The tolerances follow the numerics. Losses and first-step gradients come straight from fp32 reductions whose
    order differs between layouts (and between CPU capability levels): relative error `tol`. The final parameters
    went through AdamW, whose first steps are ~lr * g / |g| per entry: an entry whose gradient sits at the fp32
    noise floor can move by +-lr whatever its true gradient, so a parameter is compared by the size of its change,
    ||p - p_ref|| / ||p_ref - p_init|| <= update_tol (when the run recorded `init:` entries), not by its own norm,
    which the initialisation dominates."""
    ref_history, ref_state = restore(reference)
    results = restore(results)
    history = results[0][0]
    for rank_history, _ in results[1:]:  # every rank reports the same global numbers
        for a, b in zip(rank_history, history):
            assert a["loss"] == b["loss"]
    for step, (got, want) in enumerate(zip(history, ref_history)):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert abs(got[key] - want[key]) <= tol * abs(want[key]), (step, key, got[key], want[key])
        for g, w in zip(got["mtp_losses"], want["mtp_losses"]):
            assert abs(g - w) <= tol * abs(w), (step, "mtp", g, w)
        assert torch.equal(got["expert_load"], want["expert_load"]), (step, "expert_load")
        assert got["tokens"] == want["tokens"]
    state = merged_states(results)
    assert sorted(state) == sorted(ref_state), set(state) ^ set(ref_state)
    grad_errors, param_errors = [], []
    for name, want in ref_state.items():
        if name.startswith("init:"):
            continue
        if name.startswith("grad:"):
            grad_errors.append((relative_error(state[name], want), name))
            continue
        initial = ref_state.get("init:" + name)
        if initial is not None and not torch.equal(initial, want):
            change = float((want.double() - initial.double()).norm())
            error = float((state[name].double() - want.double()).norm()) / change
            param_errors.append((error / update_tol, error, name, "of its change"))
        else:
            error = relative_error(state[name], want)
            param_errors.append((error / tol, error, name, "relative"))
    worst_grad = max(grad_errors)
    assert worst_grad[0] <= tol, f"{worst_grad[1]} differs by {worst_grad[0]:.2e} (relative)"
    share, error, name, kind = max(param_errors)
    assert share <= 1, f"{name} differs by {error:.2e} ({kind})"
    return worst_grad, (error, name)


def reference_run(**kwargs):
    """The single-process run (world 1, plain forward/backward), with one micro-batch of the whole global batch."""
    return portable(train_run({}, micro_batch_size=GLOBAL_BATCH, **kwargs))


def one_thread():
    """Tiny matrices gain nothing from intra-op threads and lose a lot when the cores are shared: a fixture body."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
