"""Our files are Megatron's files: written by us, read by megatron-core, and the other way round."""

import json
import struct

import numpy as np
import pytest

from latentforge.data.config import DataConfig
from latentforge.data.preprocess import preprocess
from latentforge.data.pretrain import build_pretrain_loader
from latentforge.data.tokenizer import TokenizerMismatchError
from latentforge.data.util import megatron_datasets
from tests.data.conftest import megatron_write, random_documents

DOCS = ["first document\nwith two lines", "second: ünïcödé ✓", "x = [i ** 2 for i in range(10)]", "last one"]


def parse_idx(path):
    """An independent reader of Megatron's .idx layout: magic, version, dtype code, counts, then int32 lengths,
    int64 byte pointers and int64 document indices."""
    raw = open(path, "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    lengths = np.frombuffer(raw, np.int32, n_seq, 34)
    pointers = np.frombuffer(raw, np.int64, n_seq, 34 + 4 * n_seq)
    doc_idx = np.frombuffer(raw, np.int64, n_doc, 34 + 12 * n_seq)
    return version, code, lengths, pointers, doc_idx


def test_our_files_load_in_megatron(tmp_path, bpe_tok):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "other": 1}) + "\n" for d in DOCS))
    report = preprocess([str(src)], str(tmp_path / "out"), bpe_tok, num_workers=2, progress=False)
    expected = [bpe_tok.encode(d) + [bpe_tok.eod_id] for d in DOCS]
    assert report.num_documents == len(DOCS) and report.num_tokens == sum(map(len, expected))

    ds = megatron_datasets()[0].IndexedDataset(str(tmp_path / "out"))
    assert len(ds) == len(DOCS)
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    version, code, lengths, pointers, doc_idx = parse_idx(tmp_path / "out.idx")
    assert version == 1 and code == 8  # uint16 for a 1024-token vocabulary, as Megatron picks
    assert lengths.tolist() == [len(e) for e in expected]
    assert pointers.tolist() == (2 * np.concatenate([[0], np.cumsum(lengths)[:-1]])).tolist()
    assert doc_idx.tolist() == list(range(len(DOCS) + 1))
    raw = np.fromfile(tmp_path / "out.bin", dtype=np.uint16)
    assert raw.tolist() == sum(expected, [])
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["tokenizer"] == bpe_tok.fingerprint()
    assert (tmp_path / "out.tokenizer.json").read_bytes() == open(bpe_tok.path, "rb").read()


def _split_at_eod(tokens, eod=2):
    parts, cur = [], []
    for t in tokens:
        cur.append(int(t))
        if t == eod:
            parts.append(cur)
            cur = []
    return parts, cur


def _is_infix(piece, doc):
    n = len(piece)
    return any(tuple(doc[i : i + n]) == piece for i in range(len(doc) - n + 1))


def test_megatron_written_files_load_in_our_loader(tmp_path, bpe_tok, cache_dir):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 60, 20, 1000, max_len=10)
    prefix = megatron_write(str(tmp_path / "mega"), docs)
    seq_len = 16
    cfg = DataConfig(paths=[prefix], split="100,0,0", mask_document_end_labels=False)
    loader = build_pretrain_loader(cfg, bpe_tok, seq_len=seq_len, micro_batch_size=4)
    doc_set = {tuple(d.tolist()) for d in docs}
    seen = set()
    n_batches = loader.samples_per_epoch // 4
    for _ in range(n_batches):
        batch = next(loader)
        for x, y in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
            assert (y[:-1] == x[1:]).all()  # labels are the next tokens
            sample = list(x) + [int(y[-1])]  # the seq_len + 1 tokens of the sample
            complete, tail = _split_at_eod(sample)
            pieces = complete + ([tail] if tail else [])
            for k, piece in enumerate(pieces):
                piece = tuple(piece)
                if len(pieces) == 1:  # the sample lies inside one document
                    assert any(_is_infix(piece, d) for d in docs)
                elif k == 0:  # the sample may start in the middle of a document
                    assert any(tuple(d[len(d) - len(piece) :]) == piece for d in docs if len(d) >= len(piece))
                elif k == len(pieces) - 1:  # ... and end in the middle of another
                    assert any(tuple(d[: len(piece)]) == piece for d in docs)
                else:
                    assert piece in doc_set  # whole documents in between
                    seen.add(piece)
    # one epoch covers the documents: most appear whole inside some sample (the rest straddle sample edges)
    assert len(seen) > len(docs) // 3


def test_foreign_token_ids_are_refused(tmp_path, bpe_tok, tekken_tok, cache_dir):
    from latentforge.data.indexed import inspect_prefix

    rng = np.random.default_rng(1)
    big = megatron_write(str(tmp_path / "big"), random_documents(rng, 10, 2000, 5000), dtype=np.int32)
    with pytest.raises(TokenizerMismatchError, match="beyond the vocabulary"):
        inspect_prefix(big, bpe_tok)
    src = tmp_path / "t.txt"
    src.write_text("hello world")
    preprocess([str(src)], str(tmp_path / "ours"), bpe_tok, num_workers=1, progress=False)
    with pytest.raises(TokenizerMismatchError, match="tekken"):
        inspect_prefix(str(tmp_path / "ours"), tekken_tok)
    with pytest.raises(FileNotFoundError, match="python -m latentforge.data.preprocess"):
        inspect_prefix(str(tmp_path / "missing"), bpe_tok)
