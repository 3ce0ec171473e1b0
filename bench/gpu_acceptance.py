"""GPU acceptance run: one command, one dated JSON + Markdown report of what works on this GPU and how fast.

Parts (each guarded: a failure is recorded with its error and the next part runs; a part that cannot run here says
why it was skipped):
  environment  torch / CUDA / Triton / Transformer Engine / mamba_ssm / causal_conv1d versions, device peak
  gpu_tests    the `gpu`-marked tests (a pytest subprocess over the files that hold them; junit counts, failures)
  kernels      each Triton kernel against its *_ref: relative error and speed, forward and forward+backward
               (mamba_ssm / causal_conv1d timed beside them when importable); and CP attention's SDPA block kernel
               (efficient / flash attention per block, train/parallel/cp_attention_cuda.py) against its
               hand-written block softmax, one process (its correctness: gpu_tests, test_cp_attention_cuda.py)
  train_bf16   a bf16 train step of a ~1B-parameter hybrid (Mamba-2 / attention / LatentMoE / MTP): tokens/s,
               TFLOP/s (Megatron's hybrid formula) and MFU against the device's dense BF16 peak, peak memory
  train_fp8    the same step under Transformer Engine FP8 (current scaling), as a ratio to bf16 (when importable)
  decode       engine decode tokens/s, plain and with MTP drafting (k = 1..3), batch 1 and 8, and the cost of a
               verify step against a plain step (random weights: the accepted length is not a trained model's)
Every ratio is against a baseline measured in the same run. Peak memory is CUDA's max_memory_allocated per part.

Imports only model/, kernels/, train.flops / train.precision / model.params and model.engine (no Hydra, OmegaConf,
Ray, megatron-core, datasets: none is on the lent machine; tests/bench/test_gpu_acceptance.py checks that).

On the lent H200 (device tool; Python 3.12, torch 2.11 + CUDA, Triton 3.6, pytest, pytest-timeout preinstalled):
wheels carried: only this project's own wheel (every other import is preinstalled there). Here, once per change:

    echo /.whl/ >> .git/info/exclude; rm -rf .whl; . .venv/bin/activate
    pip wheel -q --no-deps --no-build-isolation -w .whl .

then the device tool's call (about 4-7 minutes on an H100/H200):

    run(carry=[".whl"], timeout_s=600, command="python3 -m pip install -q --no-index --no-deps --no-compile
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
        PYTHONUNBUFFERED=1 python3 bench/gpu_acceptance.py --out $OUT --budget-s 480")

Anywhere else (CPU: tiny shapes, Triton / TE / FP8 parts skipped with the reason; a control-flow check):

    python bench/gpu_acceptance.py --tiny --out /tmp/acceptance
    python bench/gpu_acceptance.py --parts kernels train_bf16      # a subset
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

try:  # run as a script: bench/ is sys.path[0]
    from timing import median_seconds
except ModuleNotFoundError:  # loaded by path (tests), with the repository root on sys.path
    from bench.timing import median_seconds

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("environment", "gpu_tests", "kernels", "train_bf16", "train_fp8", "decode")
OPTIONAL_MODULES = ("triton", "transformer_engine", "mamba_ssm", "causal_conv1d")


class Skip(Exception):
    """A part that cannot run here; the message is the reason the report gives."""


# ----- helpers ------------------------------------------------------------------------------------------------------
def on_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if on_cuda() else "cpu")


def sync():
    if on_cuda():
        torch.cuda.synchronize()


def module_version(name: str):
    """The module's version, or None when it does not import (the error is not ours to raise)."""
    try:
        module = importlib.import_module(name)
    except Exception:
        return None
    return str(getattr(module, "__version__", "present"))


def reset_peak():
    if on_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if on_cuda() else None


def relative_error(got, want) -> float:
    """max |got - want| / max |want| over every output tensor (float64)."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    worst = 0.0
    for g, w in zip(got, want):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        w64, g64 = w.detach().double(), g.detach().double().to(w.device)
        worst = max(worst, float((g64 - w64).abs().max() / w64.abs().max().clamp_min(1e-30)))
    return worst


# ----- environment --------------------------------------------------------------------------------------------------
def part_environment(args) -> dict:
    from latentforge.train.flops import device_peak_tflops

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    info.update({f"{name}_version": module_version(name) for name in OPTIONAL_MODULES})
    if on_cuda():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            peak_bf16_tflops=device_peak_tflops(device()),
        )
    else:
        info.update(device="cpu", peak_bf16_tflops=None)
    return info


# ----- gpu-marked tests ---------------------------------------------------------------------------------------------
def gpu_test_files(root: Path) -> list:
    """Test files that hold a `gpu` mark (collected alone, so no other test module's imports are needed)."""
    pattern = re.compile(r"pytest\.mark\.gpu\b|pytestmark\s*=.*\bgpu\b")
    return sorted(
        str(p.relative_to(root))
        for p in (root / "tests").rglob("test_*.py")
        if pattern.search(p.read_text(encoding="utf-8"))
    )


def run_pytest(files: list, cwd: Path, timeout_s: float, marker: str = "gpu") -> dict:
    """Run `pytest -m marker` over files in a subprocess; counts and failing test ids from its junit XML."""
    junit = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_acceptance_junit_{os.getpid()}.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        marker,
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *files,
    ]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pytest ran past its {timeout_s:.0f} s share of the budget; raise --budget-s") from None
    result = {
        "command": " ".join(command[1:]),
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not junit.exists():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}")
    result.update(parse_junit(junit))
    junit.unlink()
    if result["failures"] or result["errors"]:
        result["output_tail"] = proc.stdout[-3000:]
    return result


def parse_junit(path: Path) -> dict:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped_reasons = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        for kind in ("failure", "error"):
            if case.find(kind) is not None:
                counts[kind + "s"] += 1
                failed.append(name)
        skipped = case.find("skipped")
        if skipped is not None:
            counts["skipped"] += 1
            reason = skipped.get("message", "")
            skipped_reasons[reason] = skipped_reasons.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skipped_reasons": skipped_reasons}


def part_gpu_tests(args) -> dict:
    files = gpu_test_files(ROOT)
    if not on_cuda() and not args.force_tests:
        raise Skip(
            f"no CUDA device: the {len(files)} files of gpu-marked tests ({', '.join(files)}) skip without "
            "one (--force-tests runs them anyway)"
        )
    return run_pytest(files, ROOT, timeout_s=max(60.0, args.remaining() * 0.4))


# ----- kernels ------------------------------------------------------------------------------------------------------
def kernel_cases(tiny: bool) -> list:
    """(op, shape label, make_inputs(device, dtype) -> (args, kwargs), fast fn, ref fn, extra impls)."""
    from latentforge.kernels.conv1d import causal_conv1d, causal_conv1d_ref
    from latentforge.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
    from latentforge.kernels.moe import moe_experts, moe_experts_ref
    from latentforge.kernels.rmsnorm import gated_rms_norm, gated_rms_norm_ref
    from latentforge.kernels.ssd import ssd_scan, ssd_scan_ref

    # small-model shapes on GPU (one 1B-class layer each), a few hundred elements on CPU
    b, l, h, p, g, n, q = (1, 64, 4, 8, 2, 8, 16) if tiny else (2, 4096, 64, 64, 8, 128, 128)
    c = 16 if tiny else 4096 + 2 * 8 * 128
    rows, d, groups = (32, 64, 4) if tiny else (8192, 4096, 8)
    T, dm, I, E, k = (32, 16, 32, 4, 2) if tiny else (8192, 1024, 1024, 16, 4)
    N, H, V = (32, 16, 1000) if tiny else (8192, 2048, 32768)

    def seq_ids(length, dev):
        return (torch.arange(length, device=dev) // max(1, length // 3)).expand(b, length).to(torch.int32).contiguous()

    def ssd_inputs(dev, dt_):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, l, h, p, generator=gen)
        dt = torch.rand(b, l, h, generator=gen) * 0.1 + 0.001
        A = -(torch.rand(h, generator=gen) * 15 + 1)
        B, C = (torch.randn(b, l, g, n, generator=gen) for _ in range(2))
        tensors = [x.to(dev, dt_), dt.to(dev), A.to(dev), B.to(dev, dt_), C.to(dev, dt_), torch.ones(h, device=dev)]
        return tensors, dict(chunk_size=q, seq_idx=seq_ids(l, dev))

    def conv_inputs(dev, dt_):
        gen = torch.Generator().manual_seed(0)
        x, w, bias = (
            torch.randn(b, l, c, generator=gen),
            torch.randn(c, 4, generator=gen),
            torch.randn(c, generator=gen),
        )
        return [x.to(dev, dt_), w.to(dev), bias.to(dev)], dict(seq_idx=seq_ids(l, dev))

    def norm_inputs(dev, dt_):
        gen = torch.Generator().manual_seed(0)
        x, z = (torch.randn(rows, d, generator=gen).to(dev, dt_) for _ in range(2))
        return [x, z, torch.ones(d, device=dev), d // groups], {}

    def moe_inputs(dev, dt_):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(T, dm, generator=gen).to(dev, dt_)
        idx = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices.to(dev)
        wt = torch.rand(T, k, generator=gen).to(dev)
        up = (torch.randn(E, I, dm, generator=gen) / dm**0.5).to(dev, dt_)
        down = (torch.randn(E, dm, I, generator=gen) / I**0.5).to(dev, dt_)
        return [x, idx, wt, up, down], dict(alignment=1 if tiny else 16)

    def ce_inputs(dev, dt_):
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(N, H, generator=gen).to(dev, dt_)
        weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dev, dt_)
        labels = torch.randint(0, V, (N,), generator=gen).to(dev)
        return [hidden, weight, labels], dict(chunk_size=16 if tiny else 4096)

    # CP attention at one GPU's share of a long sequence: 1 x 8192 tokens, 16 heads (2 KV heads) of 128, 3 documents
    seq, heads, kv_heads, head_dim, block = (64, 4, 2, 16, 16) if tiny else (8192, 16, 2, 128, 1024)

    def attention_inputs(dev, dt_):
        from latentforge.train.parallel.cp_attention import block_plan

        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, n, seq, head_dim, generator=gen).to(dev, dt_) for n in (heads, kv_heads, kv_heads))
        pos = torch.arange(seq)
        doc = (pos // -(-seq // 3)).to(torch.int32)[None]
        plan = block_plan(pos, pos, doc, doc, block)  # on the host, once, as the trainer does per micro-batch
        return [q, k, v, pos.to(dev), doc.to(dev)], dict(plan=plan)

    extras = {"ssd": [("mamba_ssm", _mamba_ssm_impl)], "conv1d": [("causal_conv1d", _causal_conv1d_impl)]}
    return [
        ("ssd", f"b={b} l={l} h={h}x{p} g={g} n={n} q={q}", ssd_inputs, ssd_scan, ssd_scan_ref, extras["ssd"]),
        ("conv1d", f"b={b} l={l} c={c} k=4", conv_inputs, causal_conv1d, causal_conv1d_ref, extras["conv1d"]),
        ("gated_rmsnorm", f"rows={rows} d={d} groups={groups}", norm_inputs, gated_rms_norm, gated_rms_norm_ref, []),
        ("moe_experts", f"T={T} E={E} top{k} {dm}->{I}", moe_inputs, moe_experts, moe_experts_ref, []),
        ("linear_ce", f"N={N} H={H} V={V}", ce_inputs, linear_cross_entropy, linear_cross_entropy_ref, []),
        (
            "cp_attention",
            f"b=1 L={seq} h={heads}/{kv_heads}x{head_dim} block={block} 3 docs",
            attention_inputs,
            _cp_attention("sdpa"),
            _cp_attention("reference"),
            [],
        ),
    ]


def _cp_attention(kernel: str):
    """CP attention over one process (group None) with the given block kernel."""
    from latentforge.train.parallel.cp_attention import context_attention

    def call(q, k, v, pos, doc, plan):
        return context_attention(q, k, v, pos, pos, doc, doc, None, plan=plan, kernel=kernel)

    return call


def _fast_impl_label(op: str) -> str:
    if op == "cp_attention":
        return "sdpa blocks (efficient/flash)" if on_cuda() else "sdpa blocks (CPU flash op)"
    return "triton" if on_cuda() else "ref (no CUDA: Triton not run)"


def _mamba_ssm_impl():
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    def call(x, dt, A, B, C, D, chunk_size, seq_idx):
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx, return_final_states=True)

    return call


def _causal_conv1d_impl():
    from causal_conv1d import causal_conv1d_fn

    def call(x, w, bias, seq_idx):
        return causal_conv1d_fn(
            x.transpose(1, 2), w.to(x.dtype), bias.to(x.dtype), seq_idx=seq_idx, activation="silu"
        ).transpose(1, 2)

    return call


def _float_leaves(tensors):
    return [
        t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors
    ]


def _forward_backward(fn, tensors, kwargs):
    def run():
        leaves = _float_leaves(tensors)
        out = fn(*leaves, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()).backward()

    return run


def _upcast(tensors, dtype):
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def measure_kernel(op, shape, make_inputs, fast, ref, extras, tiny: bool, reps: int) -> dict:
    """Fast path vs reference: error against the reference in a wider dtype on the same (rounded) inputs; speed of
    both, forward and forward+backward. Without CUDA the 'fast' path is the reference in fp32, checked against fp64."""
    dev = device()
    dtype = torch.bfloat16 if on_cuda() else torch.float32
    tensors, kwargs = make_inputs(dev, dtype)
    wide = torch.float32 if on_cuda() else torch.float64
    with torch.no_grad():
        error = relative_error(fast(*tensors, **kwargs), ref(*_upcast(tensors, wide), **kwargs))
    result = {
        "op": op,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "fast_impl": _fast_impl_label(op),
        "reference": f"*_ref in {str(wide).replace('torch.', '')}",
        "relative_error": error,
        "impls": {},
    }
    impls = [("fast", fast), ("ref", ref)]
    for name, factory in extras:
        try:
            impls.append((name, factory()))
        except ImportError as exc:
            result["impls"][name] = {"skipped": f"not importable ({exc.__class__.__name__}: {exc})"}
    for name, fn in impls:
        timing = {}
        try:
            with torch.no_grad():
                timing["fwd_ms"] = 1e3 * median_seconds(lambda fn=fn: fn(*tensors, **kwargs), reps)
            timing["fwd_bwd_ms"] = 1e3 * median_seconds(_forward_backward(fn, tensors, kwargs), reps)
        except Exception as exc:  # e.g. the reference out of memory at a large shape
            timing["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        result["impls"][name] = timing
    base = result["impls"].get("ref", {})
    for name, timing in result["impls"].items():
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if name != "ref" and key in timing and key in base:
                timing[key.replace("_ms", "_speedup_vs_ref")] = base[key] / timing[key]
    return result


def part_kernels(args) -> dict:
    if on_cuda() and module_version("triton") is None:
        raise Skip("Triton does not import here")
    results, failures = [], {}
    for op, shape, make_inputs, fast, ref, extras in kernel_cases(args.tiny):
        if args.remaining() < 30:
            failures[op] = "skipped: the time budget is spent"
            continue
        reset_peak()
        try:
            entry = measure_kernel(op, shape, make_inputs, fast, ref, extras, args.tiny, reps=3 if args.tiny else 10)
            entry["peak_memory_gib"] = peak_gib()
            results.append(entry)
        except Exception as exc:
            failures[op] = f"{exc.__class__.__name__}: {exc}"[:500]
    out = {"results": results, "failed": failures}
    if not on_cuda():
        out["note"] = "no CUDA device: Triton kernels not run; the reference checked in fp32 against fp64 instead"
    return out


# ----- train steps --------------------------------------------------------------------------------------------------
def hybrid_1b_config(tiny: bool):
    """About 1.03B parameters (0.73B active): 21 layers of Mamba-2 / LatentMoE / GQA attention at hidden 2048, MTP 1."""
    from latentforge.model import ModelConfig

    if tiny:
        return ModelConfig(
            pattern="MEM*E-",
            hidden_size=64,
            vocab_size=512,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mamba_num_heads=8,
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
    return ModelConfig(
        pattern="MEMEM*EMEMEM*EMEMEM*E-",
        hidden_size=2048,
        vocab_size=32768,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        mamba_num_heads=64,
        mamba_head_dim=64,
        mamba_groups=8,
        ssm_state_size=128,
        chunk_size=128,
        num_experts=16,
        top_k=4,
        moe_intermediate_size=1024,
        moe_latent_size=1024,
        shared_expert_intermediate_size=4096,
        mlp_intermediate_size=8192,
        mtp_depths=1,
    )


def train_step_rate(cfg, precision, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    """Median step time of forward + backward + fused AdamW on synthetic tokens; throughput and MFU from it."""
    from latentforge.model import HybridModel
    from latentforge.model.params import count_parameters, training_flops_per_token
    from latentforge.train.loss import model_loss
    from latentforge.train.flops import device_peak_tflops

    dev = device()
    torch.manual_seed(0)
    model = HybridModel(cfg).to(dev)
    if on_cuda():
        model = model.bfloat16()
    table = None
    if precision is not None:
        from latentforge.train.precision import apply_precision

        table = apply_precision(model, precision)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(dev)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_cuda())
    reset_peak()
    times, loss = [], None
    for step in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        out = model_loss(model, inputs, labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        loss = float(out.loss)
    times.sort()
    step_s = times[len(times) // 2]
    tokens_per_step = batch * seq_len
    tflops = training_flops_per_token(cfg, seq_len) * tokens_per_step / step_s / 1e12
    peak = device_peak_tflops(dev)
    counts = count_parameters(model)
    return {
        "params_total": counts.total,
        "params_active": counts.active,
        "pattern": cfg.layer_pattern,
        "batch": batch,
        "seq_len": seq_len,
        "steps_timed": steps,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_tflops": peak,
        "loss": loss,
        "quantized_modules": None
        if table is None
        else sum(1 for e in table.entries if e.format not in ("bf16", "fp32")),
        "peak_memory_gib": peak_gib(),
    }


def _train_shape(args):
    if args.tiny:
        return dict(batch=2, seq_len=64, steps=2, warmup=1)
    return dict(batch=args.batch, seq_len=args.seq_len, steps=args.steps, warmup=3)


def part_train_bf16(args) -> dict:
    result = train_step_rate(hybrid_1b_config(args.tiny), None, **_train_shape(args))
    result["dtype"] = "bfloat16" if on_cuda() else "float32 (no CUDA)"
    args.baselines["train_bf16_step_ms"] = result["step_ms"]
    return result


def part_train_fp8(args) -> dict:
    from latentforge.train.precision import PrecisionConfig, te_available

    if not on_cuda():
        raise Skip("no CUDA device: Transformer Engine FP8 needs a GPU of compute capability >= 8.9")
    if torch.cuda.get_device_capability() < (8, 9):
        raise Skip(f"compute capability {torch.cuda.get_device_capability()} < 8.9: no FP8 tensor cores")
    if not te_available():
        raise Skip("Transformer Engine does not import (pip install -e .[gpu], or the Dockerfile's image)")
    result = train_step_rate(hybrid_1b_config(args.tiny), PrecisionConfig(name="fp8_current"), **_train_shape(args))
    base = args.baselines.get("train_bf16_step_ms")
    result["recipe"] = "fp8_current (TE Float8CurrentScaling, hybrid E4M3/E5M2)"
    result["speedup_vs_bf16"] = base / result["step_ms"] if base else None
    return result


# ----- decode -------------------------------------------------------------------------------------------------------
def decode_rate(model, batch: int, draft_tokens: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    from latentforge.model.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(
        model,
        EngineConfig(
            max_batch=batch, max_seq_len=prompt_len + new_tokens + 8, draft_tokens=draft_tokens, prefix_cache_size=0
        ),
    )
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=4))  # warm-up (kernels, allocator)
    engine.stats = type(engine.stats)(drafted=[0] * draft_tokens, accepted=[0] * draft_tokens)
    sync()
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - t0
    generated = sum(len(r.token_ids) for r in results)
    stats = engine.stats
    steps = stats.steps
    syncs = host_syncs_per_step(engine, prompts, params)
    return {
        "batch": batch,
        "draft_tokens": draft_tokens,
        "tokens_per_s": generated / seconds,
        "seconds": seconds,
        "steps": steps,
        "ms_per_step": 1e3 * seconds / max(1, steps),
        # synchronizing CUDA calls per engine step, counted by torch's sync debug mode in a second, untimed run
        # (admissions included); the engine reads the device back once per decode/verify step
        "host_syncs_per_step": syncs,
        "mean_accepted_length": stats.mean_accepted_length if draft_tokens else 1.0,
        "outputs": [r.token_ids for r in results],
    }


def host_syncs_per_step(engine, prompts: list, params) -> float | None:
    """Synchronizing CUDA operations per engine step over one more generate (None off CUDA)."""
    if not on_cuda():
        return None
    import warnings

    first_step = engine.stats.steps
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.generate(prompts, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return syncs / max(1, engine.stats.steps - first_step)


def part_decode(args) -> dict:
    from latentforge.model import HybridModel

    cfg = hybrid_1b_config(args.tiny)
    torch.manual_seed(0)
    model = HybridModel(cfg).to(device()).eval()
    if on_cuda():
        model = model.bfloat16()
    prompt_len, new_tokens = (8, 8) if args.tiny else (128, 128)
    rows = []
    for batch in (1, 8):
        plain = None
        for k in (0, 1, 2, 3):
            if args.remaining() < 20:
                rows.append({"batch": batch, "draft_tokens": k, "skipped": "the time budget is spent"})
                continue
            reset_peak()
            with torch.no_grad():
                row = decode_rate(model, batch, k, prompt_len, new_tokens, cfg.vocab_size)
            row["peak_memory_gib"] = peak_gib()
            outputs = row.pop("outputs")
            if k == 0:
                plain = (row, outputs)
            else:
                row["speedup_vs_plain"] = row["tokens_per_s"] / plain[0]["tokens_per_s"]
                # a verify step's cost in plain steps: with a trained model's accepted length L the speedup is
                # about L / cost (what the engine's self-gating compares)
                row["verify_cost_in_plain_steps"] = row["ms_per_step"] / plain[0]["ms_per_step"]
                row["greedy_output_identical"] = outputs == plain[1]
            rows.append(row)
    return {
        "model": cfg.layer_pattern,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "rows": rows,
        "note": "random weights: drafts are rarely accepted, so the speedup here is the cost side only; "
        "expected speedup with a trained model = accepted length / verify_cost_in_plain_steps",
    }


# ----- report -------------------------------------------------------------------------------------------------------
PART_FUNCTIONS = {
    "environment": part_environment,
    "gpu_tests": part_gpu_tests,
    "kernels": part_kernels,
    "train_bf16": part_train_bf16,
    "train_fp8": part_train_fp8,
    "decode": part_decode,
}


def run_part(name: str, args) -> dict:
    started = time.perf_counter()
    if args.remaining() <= 0:
        return {"status": "skipped", "reason": "the time budget is spent", "seconds": 0.0}
    try:
        entry = {"status": "ok", "result": PART_FUNCTIONS[name](args)}
    except Skip as reason:
        entry = {"status": "skipped", "reason": str(reason)}
    except Exception as exc:  # one failing part must not hide the others
        entry = {
            "status": "failed",
            "error": f"{exc.__class__.__name__}: {exc}"[:1000],
            "traceback": traceback.format_exc()[-4000:],
        }
    entry["seconds"] = round(time.perf_counter() - started, 2)
    return entry


def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_report(report: dict) -> str:
    env = report["parts"].get("environment", {}).get("result", {})
    lines = [
        f"# GPU acceptance run, {report['date']}",
        "",
        f"Device: {env.get('device', '?')} | torch {env.get('torch', '?')} | CUDA {env.get('cuda')} | "
        f"Triton {env.get('triton_version')} | TE {env.get('transformer_engine_version')} | "
        f"mamba_ssm {env.get('mamba_ssm_version')} | causal_conv1d {env.get('causal_conv1d_version')}",
        "",
        f"Command: `{report['command']}` ({report['mode']} mode, {report['seconds']:.0f} s)",
        "",
        "| part | status | seconds | summary |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in report["parts"].items():
        summary = entry.get("reason") or entry.get("error") or _summary(name, entry.get("result", {}))
        lines.append(f"| {name} | {entry['status'].upper()} | {entry['seconds']} | {summary} |")
    kernels = report["parts"].get("kernels", {}).get("result")
    if kernels:
        lines += [
            "",
            "## Kernels",
            "",
            "| op | shape | impl | rel. error | fwd ms | fwd+bwd ms | x ref fwd | x ref fwd+bwd | peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in kernels["results"]:
            for impl, t in r["impls"].items():
                label = r["fast_impl"] if impl == "fast" else impl
                err = _fmt(r["relative_error"]) if impl == "fast" else ""
                detail = t.get("skipped") or t.get("error")
                if detail:
                    lines.append(f"| {r['op']} | {r['shape']} | {label} | | {detail} | | | | |")
                    continue
                lines.append(
                    f"| {r['op']} | {r['shape']} | {label} | {err} | {_fmt(t.get('fwd_ms'))} | "
                    f"{_fmt(t.get('fwd_bwd_ms'))} | {_fmt(t.get('fwd_speedup_vs_ref'))} | "
                    f"{_fmt(t.get('fwd_bwd_speedup_vs_ref'))} | {_fmt(r.get('peak_memory_gib'))} |"
                )
        for op, why in kernels["failed"].items():
            lines.append(f"| {op} | | FAILED | {why} | | | | | |")
    decode = report["parts"].get("decode", {}).get("result")
    if decode:
        lines += [
            "",
            "## Decode",
            "",
            decode["note"],
            "",
            "| batch | k | tok/s | x plain | accepted length | "
            "verify cost (plain steps) | same greedy output | host syncs / step | peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in decode["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['batch']} | {r['draft_tokens']} | skipped: {r['skipped']} | | | | | | |")
                continue
            lines.append(
                f"| {r['batch']} | {r['draft_tokens']} | {_fmt(r['tokens_per_s'], 4)} | "
                f"{_fmt(r.get('speedup_vs_plain'))} | {_fmt(r['mean_accepted_length'])} | "
                f"{_fmt(r.get('verify_cost_in_plain_steps'))} | {r.get('greedy_output_identical', '')} | "
                f"{_fmt(r.get('host_syncs_per_step'))} | {_fmt(r.get('peak_memory_gib'))} |"
            )
    failed = [(n, e) for n, e in report["parts"].items() if e["status"] == "failed"]
    for name, entry in failed:
        lines += ["", f"## {name} failed", "", "```", entry.get("traceback", entry.get("error", "")), "```"]
    return "\n".join(lines) + "\n"


def _summary(name: str, result: dict) -> str:
    if name == "environment":
        return f"peak bf16 {_fmt(result.get('peak_bf16_tflops'))} TFLOP/s"
    if name == "gpu_tests":
        text = (
            f"{result['passed']} passed, {result['failures']} failed, {result['errors']} errors, "
            f"{result['skipped']} skipped"
        )
        return text + (f" ({'; '.join(result['failed'][:5])})" if result["failed"] else "")
    if name == "kernels":
        worst = max((r["relative_error"] for r in result["results"]), default=None)
        return f"{len(result['results'])} ops measured, worst rel. error {_fmt(worst)}, {len(result['failed'])} failed"
    if name.startswith("train"):
        text = (
            f"{result['params_total'] / 1e9:.3g}B params, {result['batch']}x{result['seq_len']}: "
            f"{_fmt(result['step_ms'], 4)} ms/step, {_fmt(result['tokens_per_s'], 4)} tok/s, "
            f"{_fmt(result['tflops'])} TFLOP/s, MFU {_fmt(None if result['mfu'] is None else 100 * result['mfu'])}%, "
            f"peak {_fmt(result['peak_memory_gib'])} GiB"
        )
        if "speedup_vs_bf16" in result:
            text += f", x bf16 {_fmt(result['speedup_vs_bf16'])}"
        return text
    if name == "decode":
        best = max((r.get("speedup_vs_plain", 0) for r in result["rows"]), default=0)
        return f"{len(result['rows'])} configurations, best drafting speedup {_fmt(best)}"
    return ""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "acceptance"), help="folder for the JSON + Markdown")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="parts not started by then are skipped")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--force-tests", action="store_true", help="run the gpu-marked tests even without CUDA")
    args = parser.parse_args(argv)
    args.tiny = args.tiny or not on_cuda()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    args.remaining = lambda: args.budget_s - (time.perf_counter() - started)
    args.baselines = {}
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "tiny" if args.tiny else "full",
        "command": " ".join(["python", "bench/gpu_acceptance.py", *(argv if argv is not None else sys.argv[1:])]),
        "parts": {},
    }
    for name in PARTS:
        if name not in args.parts and name != "environment":
            continue
        report["parts"][name] = entry = run_part(name, args)
        print(
            f"[gpu_acceptance] {name}: {entry['status']} ({entry['seconds']} s) "
            f"{entry.get('reason') or entry.get('error') or ''}",
            flush=True,
        )
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", report["parts"]["environment"].get("result", {}).get("device", "unknown"))
    stem = out / f"gpu_acceptance_{now.strftime('%Y%m%d_%H%M')}_{slug.strip('-').lower()}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    Path(f"{stem}.md").write_text(markdown_report(report), encoding="utf-8")
    print(markdown_report(report))
    print(f"[gpu_acceptance] wrote {stem}.json and {stem}.md")
    return 1 if any(e["status"] == "failed" for e in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
