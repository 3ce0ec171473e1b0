"""Long-sequence context parallelism on CPU: one training step (forward + backward) of the tiny hybrid model
(`recipes/model/tiny.yaml`, fp32) on one row of `seq_len` tokens (three packed documents) under CP = 1, 2, 4 over
gloo. Per layout: the loss and the worst gradient error (per parameter, by norm) against one float64 process and
against the one fp32 process of the same length (when they fit; fp32 itself sits ~1e-5 from float64 at these
lengths, summation order alone), the peak resident memory each rank added during the step (max over ranks), its
ratio to one process, the plan's activation peak for the layout (--dry-run's number), and the step time.

    python bench/bench_long_context.py --seq-lens 16384 32768 65536 --cps 1 2 4

`--kernels sdpa reference` runs every layout once per CP attention block kernel (cp_attention.py: PyTorch's SDPA
op per block, or the hand-written block softmax), in the same invocation; `--attention-only` times just
`context_attention` forward + backward on the tiny model's attention shape (one process, every block) per kernel.

`--skip-cp1-above N` leaves out single-process runs longer than N tokens (they would not fit); past that length
`--fp64-reference-cp 4` takes the float64 reference from CP4 (first shown equal to one float64 process with
`--dtype float64 --seq-lens 8192 --cps 4`). The same script
runs against an older checkout for the "before" column:

    pip install --no-deps --target /tmp/lf_old <checkout of 20e5884>
    PYTHONPATH=/tmp/lf_old python bench/bench_long_context.py --seq-lens 8192 16384 --cps 4

Each layout runs in fresh processes, one thread each, so the peaks do not carry over.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def tiny_config():
    from latentforge.model import ModelConfig
    from latentforge.model.recipes import group_values

    return ModelConfig.from_dict(group_values("model", "tiny"))


def one_row(cfg, seq_len: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    seq = torch.zeros(1, seq_len, dtype=torch.int32)
    for cut in (seq_len // 3, seq_len // 3 + seq_len // 4):  # three documents, cuts off the chunk grid
        seq[:, cut:] += 1
        labels[:, cut - 1] = -100
    return {"input_ids": ids, "labels": labels, "seq_idx": seq}


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _use_kernel(kernel: str) -> None:
    """Select the CP attention block kernel in this process (absent from checkouts before the SDPA path)."""
    try:
        from latentforge.train.parallel import cp_attention
    except ImportError:
        return
    if hasattr(cp_attention, "DEFAULT_KERNEL"):
        cp_attention.DEFAULT_KERNEL = kernel
    elif kernel != "auto":
        raise SystemExit(f"this checkout has no CP attention kernel choice (asked for {kernel})")


def run_layout(rank: int, cp: int, seq_len: int, want_grads: bool, dtype=torch.float32, kernel="auto") -> dict:
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner

    _use_kernel(kernel)

    cfg = tiny_config()
    torch.manual_seed(0)
    runner = build_runner(HybridModel(cfg).to(dtype), cfg, ParallelConfig(cp=cp))
    batch = one_row(cfg, seq_len)
    before = _rss_gib()
    start = time.perf_counter()
    result = runner.forward_backward([batch])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    grads = {name: _full(p.grad) for part in runner.model_parts for name, p in part.named_parameters()}
    out = {"loss": result["loss"], "seconds": seconds, "added_gib": peak - before}
    if want_grads and rank == 0:
        out["grads"] = {k: v.numpy() for k, v in grads.items()}
    return out


def _worker(rank, world, port, cp, seq_len, want_grads, dtype, kernel, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        results.put((rank, run_layout(rank, cp, seq_len, want_grads, dtype, kernel)))
        if world > 1:
            dist.barrier()
    except BaseException:  # noqa: BLE001 - reported by the parent
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(cp: int, seq_len: int, want_grads: bool, dtype=torch.float32, kernel="auto") -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_worker, args=(r, cp, port, cp, seq_len, want_grads, dtype, kernel, results))
        for r in range(cp)
    ]
    for p in procs:
        p.start()
    outcome = {}
    try:
        for _ in range(cp):
            rank, value = results.get(timeout=3600)
            if isinstance(value, str):
                raise RuntimeError(f"cp={cp} seq={seq_len} rank {rank} failed:\n{value}")
            outcome[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [outcome[r] for r in range(cp)]


def planned_gib(cp: int, seq_len: int, dtype) -> str:
    """The plan's activation peak for this layout (train/parallel/memory.py; absent from older checkouts)."""
    try:
        from latentforge.train.parallel import ParallelConfig
        from latentforge.train.parallel.config import validate_layout
        from latentforge.train.parallel.memory import plan_activations
    except ImportError:
        return "n/a"
    cfg, pc = tiny_config(), ParallelConfig(cp=cp)
    plan = plan_activations(
        cfg, pc, validate_layout(cfg, pc, cp), seq_len, 1, value_bytes=torch.tensor([], dtype=dtype).element_size()
    )
    return f"{plan.peak / 2**30:.2f}"


def worst_grad_error(grads: dict, reference: dict) -> tuple:
    """(relative error, parameter name) of the parameter whose gradient differs most, by its norm."""
    worst = (0.0, "")
    for name, want in reference.items():
        a, b = torch.from_numpy(grads[name]).double(), torch.from_numpy(want).double()
        worst = max(worst, (float((a - b).norm() / b.norm().clamp_min(1e-30)), name))
    return worst


def attention_only(seq_len: int, kernel: str, repeats: int = 2) -> dict:
    """context_attention forward + backward alone (one process, every block) on the tiny model's attention shape
    and the bench's three-document row: best of `repeats` seconds, and the output and input gradients."""
    from latentforge.train.parallel.cp_attention import context_attention

    cfg = tiny_config()
    g = torch.Generator().manual_seed(0)
    shapes = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads)
    q, k, v = (torch.randn(1, n, seq_len, cfg.head_dim, generator=g).requires_grad_() for n in shapes)
    doc, pos = one_row(cfg, seq_len)["seq_idx"], torch.arange(seq_len)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = context_attention(q, k, v, pos, pos, doc, doc, None, kernel=kernel)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "tensors": [out.detach(), *grads]}


def main_attention_only(seq_lens: list, kernels: list) -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, context_attention forward + backward, best of 2")
    print("| seq_len | kernel | s (fwd + bwd) | x first kernel | max rel diff vs first kernel (out, dq, dk, dv) |")
    print("|---|---|---|---|---|")
    for seq_len in seq_lens:
        first = None
        for kernel in kernels:
            run = attention_only(seq_len, kernel)
            if first is None:
                first, ratio, diff = run, "-", "-"
            else:
                ratio = f"{run['seconds'] / first['seconds']:.2f}"
                diff = ", ".join(
                    f"{float((a - b).abs().max() / b.abs().max()):.1e}"
                    for a, b in zip(run["tensors"], first["tensors"])
                )
            print(f"| {seq_len} | {kernel} | {run['seconds']:.2f} | {ratio} | {diff} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--skip-cp1-above", type=int, default=16384)
    parser.add_argument(
        "--fp64-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run one process in float64 (the exact answer every fp32 run is compared to)",
    )
    parser.add_argument(
        "--fp64-reference-cp",
        type=int,
        default=1,
        help="the float64 reference's CP size (>1 where one float64 process does not fit; check it "
        "first against one process with --dtype float64 at a length where both fit)",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="of the measured rows")
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=["auto", "sdpa", "reference"],
        default=["auto"],
        help="CP attention block kernels to run each layout with (auto: sdpa on CPU)",
    )
    parser.add_argument("--attention-only", action="store_true", help="time context_attention alone per kernel")
    args = parser.parse_args()
    if args.attention_only:
        return main_attention_only(args.seq_lens, args.kernels)
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, one thread per rank, rows in {args.dtype}, "
        f"float64 reference at cp={args.fp64_reference_cp}"
    )
    print(
        f"| seq_len | cp | kernel | loss | loss err vs fp64 | worst grad err vs fp64 | vs {args.dtype} cp=1 | "
        "peak added / rank (GiB) | x cp=1 | planned activations (GiB) | s/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        single = seq_len <= args.skip_cp1_above
        exact = None
        if args.fp64_reference and (single or args.fp64_reference_cp > 1):
            exact = launch(args.fp64_reference_cp, seq_len, want_grads=True, dtype=torch.float64)[0]
        reference = None
        for cp, kernel in [(cp, kernel) for cp in sorted(args.cps) for kernel in args.kernels]:
            if cp == 1 and not single:
                continue
            ranks = launch(cp, seq_len, want_grads=True, dtype=dtype, kernel=kernel)
            loss, grads = ranks[0]["loss"], ranks[0]["grads"]
            peak = max(r["added_gib"] for r in ranks)
            seconds = max(r["seconds"] for r in ranks)
            loss_err = grad_err = "n/a"
            if exact is not None:
                loss_err = f"{abs(loss - exact['loss']) / abs(exact['loss']):.1e}"
                grad_err = "{:.1e} ({})".format(*worst_grad_error(grads, exact["grads"]))
            if cp == 1 and reference is None:
                reference = (grads, peak)
                versus_fp32 = ratio = "-"
            elif reference is None:
                versus_fp32 = ratio = "n/a"
            else:
                versus_fp32 = "{:.1e} ({})".format(*worst_grad_error(grads, reference[0]))
                ratio = f"{peak / reference[1]:.2f}"
            print(
                f"| {seq_len} | {cp} | {kernel} | {loss:.6f} | {loss_err} | {grad_err} | {versus_fp32} | {peak:.2f} | "
                f"{ratio} | {planned_gib(cp, seq_len, dtype)} | {seconds:.1f} |".replace("backbone.", ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
