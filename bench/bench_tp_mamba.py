"""A tensor-parallel Mamba-2 layer's forward + backward: rank-contiguous weight storage (the plan,
train/parallel/tensor_parallel.py) against the previous scheme measured in the same run, which stored in_proj and
conv1d in the natural order and all-gathered them every forward (their gradients reduce-scattered back).

    python bench/bench_tp_mamba.py [--tp 2] [--hidden 1024] [--tokens 2048] [--repeats 5]

The baseline runs the same plan plus that gather: each forward all-gathers the two weights and picks this rank's
rows (what the old forward multiplied with), and the layer's output depends on them so the backward reduce-scatters
their gradients, as before. Gloo on CPU, one thread per rank.
"""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _config(hidden: int):
    from latentforge.model.config import ModelConfig

    return ModelConfig(
        hidden_size=hidden,
        vocab_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=hidden // 8,
        mamba_num_heads=hidden * 2 // 64,
        mamba_head_dim=64,
        mamba_groups=8,
        ssm_state_size=64,
        num_experts=4,
        top_k=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        mlp_intermediate_size=64,
    )


def _gather_like_before(mixer, mesh, rank: int, tp: int):
    """Forward hooks: all-gather in_proj / conv1d and take this rank's rows; the output depends on them."""
    from torch.distributed.tensor import Partial, Replicate

    from latentforge.train.parallel.tensor_parallel import rank_rows

    rows = {"in": rank_rows(mixer.in_proj_blocks(), tp, rank), "conv": rank_rows(mixer.conv_blocks(), tp, rank)}
    gathered = []

    def gather(module, args):
        for weight, key in ((mixer.in_proj.weight, "in"), (mixer.conv1d.weight, "conv")):
            full = weight.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            gathered.append(full.index_select(0, rows[key]))

    def depend(module, args, output):
        extra = sum(g.sum() for g in gathered)
        gathered.clear()
        return output + 0.0 * extra

    mixer.register_forward_pre_hook(gather)
    mixer.register_forward_hook(depend)


def _worker(rank, tp, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from torch.distributed.device_mesh import init_device_mesh

    from latentforge.model.mamba import Mamba2Mixer
    from latentforge.train.parallel.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    cfg = _config(args.hidden)
    samples = {"contiguous": [], "gather": []}
    for scheme in ("contiguous", "gather", "contiguous", "gather"):  # interleaved: machine load hits both
        torch.manual_seed(0)
        mixer = Mamba2Mixer(cfg)
        mixer.init_weights(0.02, 0.02)
        holder = torch.nn.Sequential(mixer)
        apply_tensor_parallel(holder, mesh, src_data_rank=None)
        if scheme == "gather":
            _gather_like_before(mixer, mesh, rank, tp)
        x = torch.randn(1, args.tokens // tp, args.hidden, requires_grad=True)
        for step in range(args.repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            mixer(x).square().sum().backward()
            dist.barrier()
            if step:  # the first is a warm-up
                samples[scheme].append(time.perf_counter() - start)
    times = {scheme: statistics.median(values) for scheme, values in samples.items()}
    if rank == 0:
        results.put(times)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.tp, port, args, results)) for r in range(args.tp)]
    for p in procs:
        p.start()
    times = results.get(timeout=1800)
    for p in procs:
        p.join()
    base = times["gather"]
    print(f"TP{args.tp} Mamba layer, hidden {args.hidden}, {args.tokens} tokens, fwd+bwd median of {2 * args.repeats}:")
    for scheme, seconds in times.items():
        print(f"  {scheme:10s} {seconds * 1e3:8.1f} ms  x{seconds / base:.2f} of the gathering scheme")


if __name__ == "__main__":
    main()
