"""Data pipeline benchmark: preprocessing throughput and blended batch-fetch latency.

    python bench/bench_data.py [--mb 8] [--workers 2] [--seq-len 4096] [--micro-batch 8]

1. Preprocessing tokens/s of `latentforge.data.preprocess` with N worker processes against a single-process loop
   (read file, encode, append) over the same files: the first --mb MB of the stdlib sources.
2. Batch-fetch latency of the blended pretraining loader (two sources, weights 0.7 / 0.3) against the raw cost of
   reading the same number of tokens from megatron's IndexedDataset (contiguous memory-mapped reads).

Everything runs in a temporary cache dir; ratios are against baselines measured in the same run.
"""

import argparse
import os
import resource
import statistics
import tempfile
import time

import numpy as np


def _cpu_seconds():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_preprocess(tok, files, workers, tmp):
    from latentforge.data.indexed import IndexedWriter
    from latentforge.data.preprocess import preprocess

    # Baseline: one process, one document at a time (tokenizers' encode() is single-threaded).
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    with IndexedWriter(os.path.join(tmp, "loop"), tok.vocab_size) as writer:
        for path in files:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text.strip():
                writer.add_document(tok.encode(text) + [tok.eod_id])
        writer.commit({})
    loop_s = time.perf_counter() - t0
    loop_cpu = _cpu_seconds() - c0
    loop_tokens = writer.num_tokens

    c0 = _cpu_seconds()
    report = preprocess(files, os.path.join(tmp, "parallel"), tok, num_workers=workers, progress=False)
    par_cpu = _cpu_seconds() - c0
    assert report.num_tokens == loop_tokens, (report.num_tokens, loop_tokens)
    loop_tps = loop_tokens / loop_s
    print(f"preprocess  {loop_tokens:,} tokens from {len(files)} files")
    print(f"  single-process loop        {loop_tps:12,.0f} tokens/s  ({loop_s:.2f} s wall, {loop_cpu:.2f} CPU s)")
    print(
        f"  data.preprocess {workers} workers  {report.tokens_per_s:12,.0f} tokens/s  ({report.seconds:.2f} s wall, "
        f"{par_cpu:.2f} CPU s in all processes; incl. worker start-up and reading through `datasets`)"
    )
    print(
        f"  speed-up                   {report.tokens_per_s / loop_tps:12.2f}x wall "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a shared machine skews wall times)"
    )
    return os.path.join(tmp, "parallel")


def bench_fetch(tok, prefix, tmp, seq_len, micro_batch, steps):
    from latentforge.data.config import DataConfig
    from latentforge.data.indexed import IndexedWriter
    from latentforge.data.pretrain import build_pretrain_loader
    from latentforge.data.util import megatron_datasets

    # A second source: the same token stream reversed per document, so the blend mixes two real datasets.
    ds = megatron_datasets()[0].IndexedDataset(prefix)
    with IndexedWriter(os.path.join(tmp, "reversed"), tok.vocab_size) as writer:
        for i in range(len(ds)):
            doc = ds[i]
            writer.add_document(np.concatenate([doc[:-1][::-1], doc[-1:]]))
        writer.commit({"tokenizer": tok.fingerprint()})
    cfg = DataConfig(paths=[prefix, os.path.join(tmp, "reversed")], weights=[0.7, 0.3], split="100,0,0", cache_dir=tmp)
    t0 = time.perf_counter()
    loader = build_pretrain_loader(cfg, tok, seq_len=seq_len, micro_batch_size=micro_batch)  # builds epoch 0
    build_s = time.perf_counter() - t0
    next(loader)  # warm the page cache
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - t)

    # Baseline: read micro_batch * (seq_len + 1) tokens as contiguous slices of the memory map.
    rng = np.random.default_rng(0)
    bin_tokens = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
    n = seq_len + 1
    raw = []
    for _ in range(steps):
        starts = rng.integers(0, bin_tokens.size - n, size=micro_batch)
        t = time.perf_counter()
        np.stack([np.asarray(bin_tokens[s : s + n], dtype=np.int64) for s in starts])
        raw.append(time.perf_counter() - t)
    p50, p99 = np.percentile(times, 50) * 1e3, np.percentile(times, 99) * 1e3
    raw50 = np.percentile(raw, 50) * 1e3
    print(
        f"blended fetch  seq_len {seq_len}, micro-batch {micro_batch}, {steps} batches, epoch "
        f"{loader.samples_per_epoch} samples (loader build with megatron's index {build_s:.2f} s; "
        f"{loader.epoch} epoch change(s) inside the timed batches)"
    )
    print(
        f"  loader       p50 {p50:8.3f} ms  p99 {p99:8.3f} ms  mean {statistics.mean(times) * 1e3:8.3f} ms  "
        f"({micro_batch * seq_len / np.median(times):,.0f} tokens/s)"
    )
    print(f"  raw mmap     p50 {raw50:8.3f} ms")
    print(f"  overhead     {p50 / raw50:8.1f}x the raw read")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=12.0, help="MB of stdlib sources to tokenize")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args()
    from latentforge.data.stdlib_corpus import stdlib_files
    from latentforge.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LATENTFORGE_CACHE"] = tmp
        tok = load_tokenizer("bpe:4096")
        files = stdlib_files(args.mb)
        print(f"cpu cores {os.cpu_count()}, tokenizer {tok}")
        prefix = bench_preprocess(tok, files, args.workers, tmp)
        bench_fetch(tok, prefix, tmp, args.seq_len, args.micro_batch, args.steps)


if __name__ == "__main__":
    main()
