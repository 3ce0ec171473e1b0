"""Raw text / JSONL / parquet -> Megatron indexed dataset (`<prefix>.bin/.idx`), tokenized by N processes.

    python -m latentforge.data.preprocess --input a.jsonl b.jsonl --output-prefix out/corpus --tokenizer tekken
        --json-key text --workers 8 [--skip-bad]

Parquet and whole-file text are read through Hugging Face `datasets` (offline); JSONL and line / paragraph text
line by line, each line decoded on its own. Each document becomes its tokens followed by `</s>`. A malformed
record stops the run with its file and line number (`--skip-bad` skips just that record, counts and reports it).
Output goes to temporary names renamed at the end: an interrupted run leaves no partial dataset behind.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Sequence, Tuple, cast

import numpy as np
from latentforge.model.errors import UserError, entry_point

if TYPE_CHECKING:
    from latentforge.data.tokenizer import Tokenizer

FORMATS = ("text", "jsonl", "parquet")
TEXT_UNITS = ("document", "line", "paragraph")
MAX_BAD_EXAMPLES = 20


class MalformedInputError(UserError, ValueError):
    """A record that can not be turned into a document; the message names the file and line."""


@dataclass
class PreprocessReport:
    prefix: str
    num_documents: int
    num_tokens: int
    num_bad: int
    num_empty: int
    seconds: float
    bad_examples: List[str] = field(default_factory=list)  # "file:line: reason" of the first MAX_BAD_EXAMPLES
    bad_locations: List[str] = field(default_factory=list)  # their "file:line"

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        text = (
            f"wrote {self.num_documents:,} documents, {self.num_tokens:,} tokens to {self.prefix}.bin/.idx "
            f"in {self.seconds:.1f}s ({self.tokens_per_s:,.0f} tokens/s)"
        )
        if self.num_empty:
            text += f"; {self.num_empty:,} empty documents skipped"
        if self.num_bad:
            more = ", ..." if self.num_bad > len(self.bad_locations) else ""
            text += (
                f"; {self.num_bad:,} malformed records skipped ({', '.join(self.bad_locations)}{more}); "
                f"first: {self.bad_examples[0]}"
            )
        return text


def detect_format(path: str) -> str:
    name = path.lower()
    for ext in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


# ---------------------------------------------------------------------------------------------------------------
# Reading (main process): records are (file index, location, payload); workers turn payloads into token ids.


def iter_text_documents(files: Sequence[str], text_unit: str = "document") -> Iterator[Tuple[str, int, str]]:
    """(file, location, text) for plain-text files; location is the line number (1-based; for paragraphs, its
    first line), 0 for whole-file documents."""
    for file_idx, loc, text in _iter_records(list(files), "text", text_unit, key="text"):
        yield files[file_idx], loc, cast(str, text)  # text records are str (an Undecodable is a str too)


def load_streaming(builder: str, files: List[str], **kwargs):
    from latentforge.data.util import hf_datasets

    datasets = hf_datasets()
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)


def _utf8_error(path: str) -> Tuple[int, str]:
    """(line number, reason) of the first byte sequence in `path` that is not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return line, f"not valid UTF-8 ({err.reason} at byte {err.start}); convert the file to UTF-8"
    return 0, "could not be decoded"


def _iter_records(files: List[str], fmt: str, text_unit: str, key: str) -> Iterator[Tuple[int, int, object]]:
    from latentforge.data.util import Undecodable, read_lines, read_paragraphs

    if fmt == "text" and text_unit == "document":
        # One streaming pass over all files: `datasets` yields exactly one row per file, in order. A file that is
        # not UTF-8 (one document) ends the stream: report it and go on with the files after it.
        start = 0
        while start < len(files):
            done = start
            try:
                for row in load_streaming("text", files[start:], sample_by="document"):
                    yield done, 0, row["text"]
                    done += 1
            except UnicodeDecodeError:
                line, reason = _utf8_error(files[done])
                yield done, line, Undecodable(reason)
                done += 1
            if done == start:
                break
            start = done
        if start != len(files):
            raise RuntimeError(f"expected one document per file from {len(files)} files, got {start}")
        return
    for file_idx, path in enumerate(files):
        if fmt == "parquet":
            _check_parquet_column(path, key)
            rows = load_streaming("parquet", [path], columns=[key])
            for row_no, row in enumerate(rows, start=1):
                yield file_idx, row_no, row[key]
            continue
        # JSONL and line / paragraph text are read and decoded line by line here (the workers parse JSON), so a
        # bad line is reported with its number and costs only itself: a decoder over the whole file would fail
        # the rest of the file with it.
        lines = read_paragraphs(path) if fmt == "text" and text_unit == "paragraph" else read_lines(path)
        for line_no, text in lines:
            yield file_idx, line_no, text


def _check_parquet_column(path: str, key: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise MalformedInputError(f"{path}: not a readable parquet file ({err})") from err
    if key not in names:
        raise MalformedInputError(
            f"{path}: no column {key!r} (columns: {', '.join(names)}); choose one with --json-key"
        )


def _batches(records: Iterable[Tuple[int, int, object]], max_docs: int, max_chars: int) -> Iterator[list]:
    batch, chars = [], 0
    for rec in records:
        batch.append(rec)
        payload = rec[2]
        chars += len(payload) if isinstance(payload, str) else 64
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------------------------
# Encoding (worker processes, or in-process with one worker)

_WORKER_TOKENIZER: Optional[Tokenizer] = None  # set in each pool worker by _init_worker


def _worker_context():
    """fork where available: workers start at once and, unlike spawn, never re-run the caller's main module (a
    script without a __main__ guard, a Ray worker). Workers only tokenize: no torch, no inherited threads used."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    # Each worker is one core's worth of work: no extra Rust/tiktoken threads competing with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tears the pool down
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (inherited through fork): the pool's
    # teardown terminates workers with SIGTERM, which must end them at once and quietly
    from latentforge.data.tokenizer import load_tokenizer

    _WORKER_TOKENIZER = load_tokenizer(spec)


def _extract_text(fmt: str, key: str, payload) -> str:
    """The document text of one record; raises ValueError with the reason when malformed."""
    from latentforge.data.util import Undecodable

    if isinstance(payload, Undecodable):
        raise ValueError(str(payload))
    if fmt == "jsonl":
        if not payload.strip():
            return ""
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        if key not in obj:
            raise ValueError(f"no key {key!r} (keys: {', '.join(map(str, obj))}); choose one with --json-key")
        payload = obj[key]
    if not isinstance(payload, str):
        raise ValueError(f"value of {key!r} is {type(payload).__name__}, expected a string")
    return payload


def _encode_batch(args) -> Tuple[List[np.ndarray], List[Tuple[int, int, str]], int]:
    """(token arrays of the good documents in order, malformed (file, location, reason), number of empty)."""
    fmt, key, append_eod, batch, tokenizer = args
    tokenizer = tokenizer or _WORKER_TOKENIZER
    assert tokenizer is not None, "pool workers load their tokenizer in _init_worker"
    texts, bad, empty = [], [], 0
    for file_idx, loc, payload in batch:
        try:
            text = _extract_text(fmt, key, payload)
        except ValueError as err:
            bad.append((file_idx, loc, str(err)))
            continue
        if not text.strip():
            empty += 1
            continue
        texts.append(text)
    tail = [tokenizer.eod_id] if append_eod else []
    arrays = [np.asarray(ids + tail, dtype=np.int32) for ids in tokenizer.encode_batch(texts)]
    return arrays, bad, empty


# ---------------------------------------------------------------------------------------------------------------


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer,
    *,
    fmt: str = "auto",
    json_key: str = "text",
    text_unit: str = "document",
    num_workers: int = 2,
    skip_bad: bool = False,
    append_eod: bool = True,
    progress: bool = True,
    batch_docs: int = 1024,
    batch_chars: int = 1 << 19,
    on_batch=None,
) -> PreprocessReport:
    """Tokenize `inputs` into `<output_prefix>.bin/.idx` (+ `.meta.json`, + `.tokenizer.json` for file-based
    tokenizers). `tokenizer` is a Tokenizer or a spec for data.tokenizer.load_tokenizer. `on_batch(report)` is
    called after each written batch (progress hooks, tests)."""
    from latentforge.data.indexed import TOKENIZER_SUFFIX, IndexedWriter, normalize_prefix
    from latentforge.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

    t0 = time.perf_counter()
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    files = [os.path.abspath(os.path.expanduser(p)) for p in inputs]
    if not files:
        raise ValueError("no input files given")
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"input files not found: {missing}")
    formats = {detect_format(p) for p in files} if fmt == "auto" else {fmt}
    if len(formats) != 1:
        raise ValueError(f"inputs mix formats {sorted(formats)}: preprocess each format separately or pass --format")
    fmt = formats.pop()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {FORMATS}")
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"unknown text unit {text_unit!r}: use one of {TEXT_UNITS}")
    prefix = normalize_prefix(output_prefix)
    report = PreprocessReport(prefix, 0, 0, 0, 0, 0.0)
    bar = _progress_bar(progress)
    records = _iter_records(files, fmt, text_unit, json_key)
    batches = _batches(records, batch_docs, batch_chars)

    def write(result) -> None:
        arrays, bad, empty = result
        for file_idx, loc, reason in bad:
            where = f"{files[file_idx]}:{loc}" if loc else files[file_idx]
            if not skip_bad:
                raise MalformedInputError(f"{where}: {reason} (pass --skip-bad to skip such records)")
            report.num_bad += 1
            if len(report.bad_examples) < MAX_BAD_EXAMPLES:
                report.bad_examples.append(f"{where}: {reason}")
                report.bad_locations.append(where)
        report.num_empty += empty
        for arr in arrays:
            writer.add_document(arr)
        report.num_documents, report.num_tokens = writer.num_documents, writer.num_tokens
        report.seconds = time.perf_counter() - t0
        if bar is not None:
            bar.update(len(arrays))
            bar.set_postfix_str(f"{report.tokens_per_s:,.0f} tok/s, {report.num_bad} bad")
        if on_batch is not None:
            on_batch(report)

    # A file-based tokenizer (HF, trained BPE) is copied next to the data, so the data names its tokenizer.
    tokenizer_file = tok.path if isinstance(tok, HFTokenizer) else None
    tokenizer_spec = f"hf:{prefix}{TOKENIZER_SUFFIX}" if tokenizer_file else tok.spec
    with IndexedWriter(prefix, tok.vocab_size, tokenizer_file=tokenizer_file) as writer:
        try:
            if num_workers <= 1:
                for batch in batches:
                    write(_encode_batch((fmt, json_key, append_eod, batch, tok)))
            else:
                ctx = _worker_context()
                with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tok.spec,)) as pool:
                    pending = deque()
                    for batch in batches:  # bounded in flight: input is read only as fast as it is encoded
                        pending.append(pool.apply_async(_encode_batch, ((fmt, json_key, append_eod, batch, None),)))
                        if len(pending) >= 2 * num_workers + 2:
                            write(pending.popleft().get())
                    while pending:
                        write(pending.popleft().get())
        finally:
            if bar is not None:
                bar.close()
        writer.commit(
            {
                "created_by": "latentforge data.preprocess",
                "tokenizer": tok.fingerprint(),
                "tokenizer_spec": tokenizer_spec,
                "sources": files,
                "format": fmt,
                "json_key": json_key,
                "text_unit": text_unit,
                "append_eod": append_eod,
                "eod_id": tok.eod_id,
                "num_bad": report.num_bad,
                "num_empty": report.num_empty,
            }
        )
    report.seconds = time.perf_counter() - t0
    return report


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def train_bpe_on_inputs(
    inputs: Sequence[str],
    vocab_size: int,
    save_path: str,
    *,
    fmt: str = "auto",
    json_key: str = "text",
    text_unit: str = "document",
    max_mb: float = 64.0,
):
    """Train a byte-level BPE on the first `max_mb` MB of the inputs' documents (malformed records skipped)."""
    from latentforge.data.tokenizer import train_bpe

    files = [os.path.abspath(os.path.expanduser(p)) for p in inputs]
    fmt = detect_format(files[0]) if fmt == "auto" else fmt

    def texts():
        budget = max_mb * 1e6
        for _f, _loc, payload in _iter_records(files, fmt, text_unit, json_key):
            try:
                text = _extract_text(fmt, json_key, payload)
            except ValueError:
                continue
            if text.strip():
                yield text
                budget -= len(text)
                if budget <= 0:
                    return

    return train_bpe(texts(), vocab_size, save_path)


def _raise_keyboard_interrupt(signum, frame):
    # SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so the temporary files are removed.
    raise KeyboardInterrupt


@entry_point("latentforge-preprocess")
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m latentforge.data.preprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, help="text, JSONL or parquet files")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, <prefix>.idx, <prefix>.meta.json")
    parser.add_argument(
        "--tokenizer",
        default="bpe",
        help="tekken | bpe[:vocab] (stdlib-trained) | hf:<tokenizer.json> | train-bpe:<vocab> "
        "(train a BPE on these inputs, saved as <prefix>.tokenizer.json)",
    )
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    parser.add_argument("--json-key", default="text", help="JSONL key / parquet column holding the text")
    parser.add_argument(
        "--text-unit",
        default="document",
        choices=TEXT_UNITS,
        help="plain text: one document per file, line or blank-line-separated paragraph",
    )
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--skip-bad", action="store_true", help="count and skip malformed records")
    parser.add_argument("--no-eod", action="store_true", help="do not append </s> to each document")
    parser.add_argument("--train-max-mb", type=float, default=64.0, help="train-bpe: MB of text to train on")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    tokenizer, trained_tmp = args.tokenizer, None
    try:
        if tokenizer.startswith("train-bpe:"):
            from latentforge.data.indexed import TOKENIZER_SUFFIX, normalize_prefix

            # Trained under a temporary name; preprocess copies it to <prefix>.tokenizer.json with the data.
            trained_tmp = f"{normalize_prefix(args.output_prefix)}{TOKENIZER_SUFFIX}.train-{os.getpid()}"
            tokenizer = train_bpe_on_inputs(
                args.input,
                int(tokenizer.split(":", 1)[1]),
                trained_tmp,
                fmt=args.format,
                json_key=args.json_key,
                text_unit=args.text_unit,
                max_mb=args.train_max_mb,
            )
            print(f"trained a {tokenizer.vocab_size}-token BPE", file=sys.stderr)
        report = preprocess(
            args.input,
            args.output_prefix,
            tokenizer,
            fmt=args.format,
            json_key=args.json_key,
            text_unit=args.text_unit,
            num_workers=args.workers,
            skip_bad=args.skip_bad,
            append_eod=not args.no_eod,
            progress=not args.quiet,
        )
    except (MalformedInputError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if trained_tmp and os.path.exists(trained_tmp):
            os.remove(trained_tmp)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
