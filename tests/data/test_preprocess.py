import glob
import json

import pytest

from latentforge.data.preprocess import MalformedInputError, main, preprocess
from latentforge.data.tokenizer import load_tokenizer
from latentforge.data.util import megatron_datasets


def read_docs(prefix):
    ds = megatron_datasets()[0].IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def expected(tok, texts):
    return [tok.encode(t) + [tok.eod_id] for t in texts]


def leftovers(tmp_path, name):
    return sorted(glob.glob(str(tmp_path / f"{name}*")))


def test_text_units_and_empty_documents(tmp_path, bpe_tok):
    a = tmp_path / "a.txt"
    a.write_text("line one\nline two\n\n\npara two first\npara two second\n")
    b = tmp_path / "b.md"
    b.write_text("")
    out = str(tmp_path / "doc")
    report = preprocess([str(a), str(b)], out, bpe_tok, num_workers=1, progress=False)
    assert read_docs(out) == expected(bpe_tok, [a.read_text()])
    assert report.num_empty == 1
    preprocess([str(a)], out + "_lines", bpe_tok, text_unit="line", num_workers=1, progress=False)
    assert read_docs(out + "_lines") == expected(bpe_tok, ["line one", "line two", "para two first",
                                                           "para two second"])
    preprocess([str(a)], out + "_para", bpe_tok, text_unit="paragraph", num_workers=1, progress=False)
    assert len(read_docs(out + "_para")) == 2


def test_jsonl_key_and_parquet(tmp_path, bpe_tok):
    rows = [{"body": f"document number {i}", "id": i} for i in range(7)]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    preprocess([str(src)], str(tmp_path / "j"), bpe_tok, json_key="body", num_workers=1, progress=False)
    assert read_docs(str(tmp_path / "j")) == expected(bpe_tok, [r["body"] for r in rows])

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [r["body"] for r in rows], "id": [r["id"] for r in rows]}),
                   str(tmp_path / "d.parquet"))
    preprocess([str(tmp_path / "d.parquet")], str(tmp_path / "p"), bpe_tok, json_key="body", num_workers=1,
               progress=False)
    assert read_docs(str(tmp_path / "p")) == read_docs(str(tmp_path / "j"))
    with pytest.raises(MalformedInputError, match="no column 'text'.*body, id"):
        preprocess([str(tmp_path / "d.parquet")], str(tmp_path / "p2"), bpe_tok, num_workers=1, progress=False)


BAD_JSONL = ('{"text": "good one"}\n'
             '{"text": "good two"}\n'
             '{"text": "broken\n'
             '{"txt": "wrong key"}\n'
             '{"text": 42}\n'
             '{"text": "good three"}\n')


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_line_names_file_and_line_and_leaves_nothing(tmp_path, bpe_tok, workers):
    src = tmp_path / "bad.jsonl"
    src.write_text(BAD_JSONL)
    with pytest.raises(MalformedInputError, match=r"bad\.jsonl:3: invalid JSON"):
        preprocess([str(src)], str(tmp_path / "out"), bpe_tok, num_workers=workers, progress=False)
    assert leftovers(tmp_path, "out") == []


def test_text_that_is_not_utf8(tmp_path, bpe_tok):
    good, bad = tmp_path / "good.txt", tmp_path / "latin1.txt"
    good.write_text("fine\ntext\n")
    bad.write_bytes("caf\u00e9 ok\nna\u00efve\n".encode("latin-1"))
    for unit in ("document", "line"):
        with pytest.raises(MalformedInputError, match=r"latin1\.txt.*not valid UTF-8"):
            preprocess([str(bad), str(good)], str(tmp_path / unit), bpe_tok, text_unit=unit, num_workers=1,
                       progress=False)
    with pytest.raises(MalformedInputError, match=r"latin1\.txt:1: not valid UTF-8"):
        preprocess([str(bad)], str(tmp_path / "x"), bpe_tok, text_unit="line", num_workers=1, progress=False)
    report = preprocess([str(bad), str(good)], str(tmp_path / "skip"), bpe_tok, skip_bad=True, num_workers=1,
                        progress=False)
    assert report.num_bad == 1 and read_docs(str(tmp_path / "skip")) == expected(bpe_tok, [good.read_text()])


def test_skip_bad_counts_and_reports(tmp_path, bpe_tok):
    src = tmp_path / "bad.jsonl"
    src.write_text(BAD_JSONL)
    report = preprocess([str(src)], str(tmp_path / "out"), bpe_tok, skip_bad=True, num_workers=1, progress=False)
    assert report.num_bad == 3
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in report.bad_examples] == ["3", "4", "5"]
    assert "no key 'text' (keys: txt)" in report.bad_examples[1]
    assert "value of 'text' is int" in report.bad_examples[2]
    assert read_docs(str(tmp_path / "out")) == expected(bpe_tok, ["good one", "good two", "good three"])
    assert "3 malformed records skipped" in report.summary()


def test_interrupted_run_leaves_nothing(tmp_path, bpe_tok):
    src = tmp_path / "many.txt"
    src.write_text("\n".join(f"line {i}" for i in range(50)))

    def interrupt(report):
        if report.num_documents >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess([str(src)], str(tmp_path / "out"), bpe_tok, text_unit="line", num_workers=1, progress=False,
                   batch_docs=5, on_batch=interrupt)
    assert leftovers(tmp_path, "out") == []


def test_parallel_output_equals_single_process(tmp_path, bpe_tok):
    srcs = []
    for k in range(3):
        p = tmp_path / f"f{k}.txt"
        p.write_text("\n".join(f"file {k} line {i} " + "word " * (i % 7) for i in range(200)))
        srcs.append(str(p))
    preprocess(srcs, str(tmp_path / "one"), bpe_tok, text_unit="line", num_workers=1, progress=False)
    preprocess(srcs, str(tmp_path / "two"), bpe_tok, text_unit="line", num_workers=2, progress=False, batch_docs=37)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_cli_trains_bpe_next_to_data_and_reports_errors(tmp_path, capsys, cache_dir):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"sample text {i} " * 5}) for i in range(40)) + "\n")
    out = str(tmp_path / "cli")
    assert main(["--input", str(src), "--output-prefix", out, "--tokenizer", "train-bpe:300", "--workers", "1",
                 "--quiet"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    meta = json.loads(open(out + ".meta.json").read())
    reloaded = load_tokenizer(meta["tokenizer_spec"])  # the BPE saved next to the data
    assert reloaded.fingerprint()["sha256"] == meta["tokenizer"]["sha256"] and reloaded.vocab_size == 300
    assert read_docs(out)[0] == reloaded.encode("sample text 0 " * 5) + [2]
    assert sorted(glob.glob(out + "*")) == sorted(out + s for s in (".bin", ".idx", ".meta.json", ".tokenizer.json"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_JSONL)
    assert main(["--input", str(bad), "--output-prefix", str(tmp_path / "x"), "--tokenizer", f"hf:{out}"
                 ".tokenizer.json", "--workers", "1", "--quiet"]) == 2
    assert "bad.jsonl:3" in capsys.readouterr().err
    assert leftovers(tmp_path, "x") == []
