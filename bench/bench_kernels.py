"""Kernel benchmarks: one table per op (shape, time, TFLOP/s, GB/s, ratio against a baseline measured in
the same run). Prints; asserts nothing.

GPU: the dispatcher (Triton) against the pure-PyTorch reference, forward and forward+backward, at
Super's shapes and a small-model shape, plus mamba_ssm / causal_conv1d when installed.
CPU: the reference against the float64 naive loops of tests/kernels at small shapes (about a minute).

    python bench/bench_kernels.py                 # every op
    python bench/bench_kernels.py --ops ssd conv1d
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from latentforge.kernels.conv1d import causal_conv1d, causal_conv1d_ref  # noqa: E402
from latentforge.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref  # noqa: E402
from latentforge.kernels.moe import moe_experts, moe_experts_ref  # noqa: E402
from latentforge.kernels.rmsnorm import gated_rms_norm, gated_rms_norm_ref  # noqa: E402
from latentforge.kernels.ssd import ssd_scan, ssd_scan_ref  # noqa: E402
from timing import median_seconds  # noqa: E402 - bench/ is sys.path[0] when run as a script

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


# ------------------------------------------------------------------------------------------------ timing


def _fwd_bwd(fn, inputs):
    """A closure running forward and backward (summing every output) on fresh leaf copies."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

    def run():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs).backward()

    return run


def _row(op, shape, pass_, impl, secs, flops, nbytes, base):
    ratio = f"{base / secs:8.2f}x" if base else "    base"
    print(
        f"{op:8s} {shape:34s} {pass_:8s} {impl:14s} {secs * 1e3:10.3f} ms {flops / secs / 1e12:8.3g} "
        f"{nbytes / secs / 1e9:9.1f}  {ratio}"
    )


def _header():
    print(
        f"{'op':8s} {'shape':34s} {'pass':8s} {'impl':14s} {'time':>13s} {'TFLOP/s':>8s} {'GB/s':>9s}  "
        f"speedup vs {BASE}"
    )


# ------------------------------------------------------------------------------------------------ ops


def bench_ssd(shapes, reps):
    for label, (b, l, h, p, g, n, q), dtype in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, l, h, p, generator=gen).to(DEV, dtype)
        dt = (torch.rand(b, l, h, generator=gen) * 0.1 + 0.001).to(DEV)
        A = -(torch.rand(h, generator=gen) * 15 + 1).to(DEV)
        B, C = (torch.randn(b, l, g, n, generator=gen).to(DEV, dtype) for _ in range(2))
        D = torch.ones(h, device=DEV)
        seq = (torch.arange(l, device=DEV) // max(1, l // 3)).expand(b, l).to(torch.int32).contiguous()
        # per head and token: intra-chunk 2Q(N+P) (CB and M x, averaged causal half counted in full), state 4PN
        flops = b * l * h * (2 * q * (n + p) + 4 * p * n)
        nbytes = 2 * x.numel() * x.element_size() + 2 * B.numel() * B.element_size() + dt.numel() * 4
        shape = f"{label} l={l} h={h}x{p} n={n} g={g}"
        inputs = [x, dt, A, B, C, D]

        def call(fn):
            return lambda *a: fn(*a, chunk_size=q, seq_idx=seq)

        impls = [("ref", call(ssd_scan_ref))]
        if CUDA:
            impls.insert(0, ("triton", call(ssd_scan)))
            try:
                from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

                impls.append(
                    (
                        "mamba_ssm",
                        lambda x_, dt_, A_, B_, C_, D_: mamba_chunk_scan_combined(
                            x_, dt_, A_, B_, C_, q, D=D_, seq_idx=seq, return_final_states=True
                        ),
                    )
                )
            except ImportError:
                pass
        else:
            from tests.kernels.kernel_naive import ssd_naive

            impls.append(("naive fp64", lambda *a: ssd_naive(*a, seq_idx=seq)))
        _run_impls("ssd", shape, impls, inputs, flops, nbytes, reps, backward=CUDA)


def bench_conv1d(shapes, reps):
    for label, (b, l, c, k), dtype in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, l, c, generator=gen).to(DEV, dtype)
        w = torch.randn(c, k, generator=gen).to(DEV)
        bias = torch.randn(c, generator=gen).to(DEV)
        seq = (torch.arange(l, device=DEV) // max(1, l // 3)).expand(b, l).to(torch.int32).contiguous()
        flops, nbytes = 2 * b * l * c * k, 2 * x.numel() * x.element_size()
        shape = f"{label} l={l} c={c} k={k}"
        impls = [("ref", lambda *a: causal_conv1d_ref(*a, seq_idx=seq))]
        if CUDA:
            impls.insert(0, ("triton", lambda *a: causal_conv1d(*a, seq_idx=seq)))
            try:
                from causal_conv1d import causal_conv1d_fn

                impls.append(
                    (
                        "causal_conv1d",
                        lambda x_, w_, b_: causal_conv1d_fn(
                            x_.transpose(1, 2), w_.to(x_.dtype), b_.to(x_.dtype), seq_idx=seq, activation="silu"
                        ),
                    )
                )
            except ImportError:
                pass
        else:
            from tests.kernels.kernel_naive import conv1d_naive

            impls.append(("naive fp64", lambda *a: conv1d_naive(*a, seq_idx=seq)))
        _run_impls("conv1d", shape, impls, [x, w, bias], flops, nbytes, reps, backward=CUDA)


def bench_norm(shapes, reps):
    for label, (rows, d, groups), dtype in shapes:
        gen = torch.Generator().manual_seed(0)
        x, z = (torch.randn(rows, d, generator=gen).to(DEV, dtype) for _ in range(2))
        w = torch.ones(d, device=DEV)
        gs = d // groups
        flops, nbytes = 8 * rows * d, 3 * x.numel() * x.element_size()
        impls = [("ref", lambda *a: gated_rms_norm_ref(*a, gs))]
        if CUDA:
            impls.insert(0, ("triton", lambda *a: gated_rms_norm(*a, gs)))
        else:
            from tests.kernels.kernel_naive import gated_rms_norm_naive

            impls.append(("naive fp64", lambda *a: gated_rms_norm_naive(*a, gs)))
        _run_impls(
            "gnorm", f"{label} rows={rows} d={d} g={groups}", impls, [x, z, w], flops, nbytes, reps, backward=CUDA
        )


def bench_moe(shapes, reps):
    for label, (T, d, I, E, k, align), dtype in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(T, d, generator=gen).to(DEV, dtype)
        w_up = (torch.randn(E, I, d, generator=gen) / d**0.5).to(DEV, dtype)
        w_down = (torch.randn(E, d, I, generator=gen) / I**0.5).to(DEV, dtype)
        idx = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices.to(DEV)
        wt = torch.rand(T, k, generator=gen).to(DEV)
        flops = 2 * T * k * 2 * d * I
        nbytes = 2 * w_up.numel() * w_up.element_size() + 2 * T * k * d * x.element_size()
        shape = f"{label} T={T} E={E} k={k} {d}->{I}"
        impls = [("ref", lambda x_, wt_, u_, dn_: moe_experts_ref(x_, idx, wt_, u_, dn_, alignment=align))]
        if CUDA:
            impls.insert(0, ("triton", lambda x_, wt_, u_, dn_: moe_experts(x_, idx, wt_, u_, dn_, alignment=align)))
        else:
            from tests.kernels.kernel_naive import moe_naive

            impls.append(("naive fp64", lambda x_, wt_, u_, dn_: moe_naive(x_, idx, wt_, u_, dn_)))
        _run_impls("moe", shape, impls, [x, wt, w_up, w_down], flops, nbytes, reps, backward=CUDA)


def bench_ce(shapes, reps):
    for label, (N, H, V, chunk), dtype in shapes:
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(N, H, generator=gen).to(DEV, dtype)
        weight = (torch.randn(V, H, generator=gen) / H**0.5).to(DEV, dtype)
        labels = torch.randint(0, V, (N,), generator=gen).to(DEV)
        flops, nbytes = 2 * N * H * V, weight.numel() * weight.element_size() + hidden.numel() * hidden.element_size()
        shape = f"{label} N={N} H={H} V={V}"

        def unfused(h, w):  # what the head costs without chunking: full fp32 logits
            return torch.nn.functional.cross_entropy((h @ w.t()).float(), labels)

        impls = [("ref", lambda h, w: linear_cross_entropy_ref(h, w, labels, chunk_size=chunk))]
        if CUDA:
            impls.insert(0, ("triton", lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=chunk)))
            impls.append(("torch unfused", unfused))
        else:
            from tests.kernels.kernel_naive import cross_entropy_naive

            impls.append(("naive fp64", lambda h, w: cross_entropy_naive(h, w, labels)))
        _run_impls("ce", shape, impls, [hidden, weight], flops, nbytes, reps, backward=CUDA, bwd_flops_factor=4)


BASE = "ref" if CUDA else "naive fp64"  # the baseline each table row is compared with


def _run_impls(op, shape, impls, inputs, flops, nbytes, reps, backward, bwd_flops_factor=3):
    """Forward (and forward+backward on GPU) of each impl; ratio = baseline time / impl time."""
    passes = [("fwd", flops, nbytes)] + ([("fwd+bwd", flops * bwd_flops_factor, nbytes * 3)] if backward else [])
    for pass_, fl, nb in passes:
        results = []
        for name, fn in impls:
            if pass_ == "fwd":

                def run(fn=fn):
                    with torch.no_grad():
                        fn(*inputs)
            else:
                run = _fwd_bwd(fn, inputs)
            try:
                results.append((name, median_seconds(run, reps)))
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. the reference out of memory
                print(f"{op:8s} {shape:34s} {pass_:8s} {name:14s} failed: {str(exc).splitlines()[0][:60]}")
            if CUDA:
                torch.cuda.empty_cache()
        base = dict(results).get(BASE)
        for name, secs in results:
            _row(op, shape, pass_, name, secs, fl, nb, None if name == BASE else base)


# ------------------------------------------------------------------------------------------------ shapes


def gpu_shapes():
    bf16 = torch.bfloat16
    return {
        # Super: 128 heads x 64, state 128, 8 groups, chunk 128; small: 16 heads x 64, state 64, 2 groups
        "ssd": [("super", (1, 8192, 128, 64, 8, 128, 128), bf16), ("small", (4, 2048, 16, 64, 2, 64, 128), bf16)],
        # conv channels: d_inner + 2 G N
        "conv1d": [("super", (1, 8192, 8192 + 2 * 8 * 128, 4), bf16), ("small", (4, 2048, 1024 + 2 * 2 * 64, 4), bf16)],
        "norm": [("super", (8192, 8192, 8), bf16), ("small", (8192, 1024, 2), bf16)],
        # experts live in the 1024 latent; alignment 16 (FP8 GEMMs); small: 8 experts top-2 at 512
        "moe": [("super", (4096, 1024, 2688, 512, 22, 16), bf16), ("small", (8192, 512, 1024, 8, 2, 16), bf16)],
        "ce": [("super", (8192, 4096, 131072, 4096), bf16), ("small", (8192, 512, 131072, 4096), bf16)],
    }


def cpu_shapes():
    f32 = torch.float32
    return {
        "ssd": [("tiny", (1, 64, 4, 8, 2, 8, 16), f32)],
        "conv1d": [("tiny", (1, 64, 16, 4), f32)],
        "norm": [("tiny", (32, 64, 4), f32)],
        "moe": [("tiny", (32, 16, 32, 4, 2, 1), f32)],
        "ce": [("tiny", (32, 16, 1000, 16), f32)],
    }


BENCHES = {"ssd": bench_ssd, "conv1d": bench_conv1d, "norm": bench_norm, "moe": bench_moe, "ce": bench_ce}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=sorted(BENCHES), default=list(BENCHES))
    parser.add_argument("--reps", type=int, default=10 if CUDA else 3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1 by default: on a shared machine 2-thread ops stall on a busy core)",
    )
    args = parser.parse_args(argv)
    if not CUDA:
        torch.set_num_threads(args.threads)
    shapes = gpu_shapes() if CUDA else cpu_shapes()
    where = torch.cuda.get_device_name() if CUDA else "CPU (reference vs float64 naive loops; Triton needs CUDA)"
    print(f"# kernels benchmark on {where}, torch {torch.__version__}")
    _header()
    for op in args.ops:
        BENCHES[op](shapes[op], args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
