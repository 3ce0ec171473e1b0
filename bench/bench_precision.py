"""Precision benchmarks.

loss  (any machine): train the tiny hybrid model a few hundred steps on a synthetic Markov corpus without
      quantization and with each requested recipe emulated (kernels/quant.py); print the loss curves and the
      gap to the unquantized curve (mean of the last 20 steps), and the step-time ratio of the emulation.
speed (CUDA + Transformer Engine): step time of a small hybrid model in BF16 and under each TE recipe this
      GPU runs (FP8 recipes on an H100; MXFP8/NVFP4 need compute capability 10.0), as ratios to BF16
      measured in the same run.

    python bench/bench_precision.py loss --steps 300 --recipes nvfp4
    python bench/bench_precision.py speed --steps 30
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from latentforge.model.recipes import group_values

from latentforge.kernels.quant import RECIPES
from latentforge.model import ModelConfig
from latentforge.train.precision import PrecisionConfig, apply_precision, format_table, te_available
from latentforge.train.loss import model_loss
from latentforge.train.precision.compare import markov_batches, tail_mean, train_loss_curve

ROOT = Path(__file__).resolve().parent.parent


def load_precision(name: str, **overrides) -> PrecisionConfig:
    values = {**group_values("precision", name), **overrides}
    return PrecisionConfig.from_dict(values)


def tiny_config() -> ModelConfig:
    return ModelConfig.from_dict(group_values("model", "tiny"))


def bench_loss(args) -> None:
    cfg = tiny_config()
    torch.set_num_threads(args.threads)
    batches = markov_batches(args.steps, args.batch, args.seq_len, cfg.vocab_size, used_vocab=args.used_vocab)
    print(
        f"tiny model {cfg.layer_pattern} hidden {cfg.hidden_size}, mtp {cfg.mtp_depths}; {args.steps} steps of "
        f"{args.batch}x{args.seq_len} tokens; {torch.get_num_threads()} threads; {platform.processor() or 'cpu'}"
    )
    base, base_t = train_loss_curve(cfg, None, batches, lr=args.lr)
    rows = [("bf16 (no quantization)", base, base_t)]
    for name in args.recipes:
        keep_last = 1 if name == "nvfp4" else 0  # 1 of 6 layers, as the real run keeps ~1/6 of its layers
        pc = load_precision(name, emulate=True, keep_last_layers=keep_last)
        curve, t = train_loss_curve(cfg, pc, batches, lr=args.lr)
        rows.append((f"{name} emulated", curve, t))
    marks = sorted({0, 9, 49, 99, 199, args.steps - 1} & set(range(args.steps)))
    print("\nlm loss at step " + " ".join(f"{m + 1:>7d}" for m in marks) + "   tail20   gap    s/step  x bf16")
    for label, curve, t in rows:
        gap = tail_mean(curve, 20) - tail_mean(base, 20)
        print(
            f"{label:24s}"
            + " ".join(f"{curve[m]:7.4f}" for m in marks)
            + f"  {tail_mean(curve, 20):7.4f} {gap:+.4f} {t:7.3f}  {t / base_t:5.2f}"
        )


def small_gpu_config() -> ModelConfig:
    # every GEMM dim a multiple of 32 (Mamba in_proj 4640), so every TE recipe accepts the shapes
    return ModelConfig(
        pattern="MEM*EMEM*E-",
        hidden_size=1024,
        vocab_size=32768,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        mamba_num_heads=32,
        mamba_head_dim=64,
        mamba_groups=4,
        ssm_state_size=64,
        chunk_size=128,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=1024,
        moe_latent_size=512,
        shared_expert_intermediate_size=2048,
        mlp_intermediate_size=4096,
        mtp_depths=0,
    )


def bench_speed(args) -> None:
    if not torch.cuda.is_available() or not te_available():
        raise SystemExit("speed mode needs a CUDA GPU and Transformer Engine (pip install -e .[gpu])")
    from latentforge.model import HybridModel

    cap = torch.cuda.get_device_capability()
    names = ["bf16", "fp8_current", "fp8_delayed", "fp8_block"] + (["mxfp8", "nvfp4"] if cap >= (10, 0) else [])
    cfg = small_gpu_config()
    batch = markov_batches(1, args.batch, args.seq_len, cfg.vocab_size, used_vocab=4096)[0]
    inputs, labels = (t.cuda() for t in batch)
    print(
        f"{torch.cuda.get_device_name()} (cc {cap[0]}.{cap[1]}), model {cfg.layer_pattern} hidden "
        f"{cfg.hidden_size}, batch {args.batch}x{args.seq_len}, bf16 params"
    )
    results = {}
    for name in names:
        torch.manual_seed(0)
        model = HybridModel(cfg).cuda().bfloat16()
        overrides = {"keep_last_layers": 0}
        table = apply_precision(model, load_precision(name, **overrides))
        if args.verbose:
            print(format_table(table))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        times = []
        for step in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model_loss(model, inputs, labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        results[name] = times[len(times) // 2]
        print(
            f"{name:12s} median step {results[name] * 1e3:8.2f} ms   x bf16 {results[name] / results['bf16']:.3f}"
            f"   loss {float(out.lm_loss):.3f}",
            flush=True,
        )
        del model, opt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    loss = sub.add_parser("loss")
    loss.add_argument("--steps", type=int, default=300)
    loss.add_argument("--batch", type=int, default=8)
    loss.add_argument("--seq-len", type=int, default=64)
    loss.add_argument("--used-vocab", type=int, default=1024)
    loss.add_argument("--lr", type=float, default=3e-3)
    loss.add_argument("--threads", type=int, default=1)
    loss.add_argument("--recipes", type=lambda s: [r for r in s.split(",") if r], default=["nvfp4"])
    speed = sub.add_parser("speed")
    speed.add_argument("--steps", type=int, default=30)
    speed.add_argument("--warmup", type=int, default=5)
    speed.add_argument("--batch", type=int, default=8)
    speed.add_argument("--seq-len", type=int, default=2048)
    speed.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "loss":
        unknown = [r for r in args.recipes if r not in RECIPES or r == "bf16"]
        if unknown:
            parser.error(f"--recipes: {unknown} not among {', '.join(RECIPES[1:])}")
        bench_loss(args)
    else:
        bench_speed(args)


if __name__ == "__main__":
    main()
