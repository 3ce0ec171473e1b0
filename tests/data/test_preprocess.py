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
    assert read_docs(out + "_lines") == expected(bpe_tok, ["line one", "line two", "para two first", "para two second"])
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

    pq.write_table(
        pa.table({"body": [r["body"] for r in rows], "id": [r["id"] for r in rows]}), str(tmp_path / "d.parquet")
    )
    preprocess(
        [str(tmp_path / "d.parquet")], str(tmp_path / "p"), bpe_tok, json_key="body", num_workers=1, progress=False
    )
    assert read_docs(str(tmp_path / "p")) == read_docs(str(tmp_path / "j"))
    with pytest.raises(MalformedInputError, match="no column 'text'.*body, id"):
        preprocess([str(tmp_path / "d.parquet")], str(tmp_path / "p2"), bpe_tok, num_workers=1, progress=False)


BAD_JSONL = (
    '{"text": "good one"}\n'
    '{"text": "good two"}\n'
    '{"text": "broken\n'
    '{"txt": "wrong key"}\n'
    '{"text": 42}\n'
    '{"text": "good three"}\n'
)


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
            preprocess(
                [str(bad), str(good)], str(tmp_path / unit), bpe_tok, text_unit=unit, num_workers=1, progress=False
            )
    with pytest.raises(MalformedInputError, match=r"latin1\.txt:1: not valid UTF-8"):
        preprocess([str(bad)], str(tmp_path / "x"), bpe_tok, text_unit="line", num_workers=1, progress=False)
    report = preprocess(
        [str(bad), str(good)], str(tmp_path / "skip"), bpe_tok, skip_bad=True, num_workers=1, progress=False
    )
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
        preprocess(
            [str(src)],
            str(tmp_path / "out"),
            bpe_tok,
            text_unit="line",
            num_workers=1,
            progress=False,
            batch_docs=5,
            on_batch=interrupt,
        )
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
    assert (
        main(["--input", str(src), "--output-prefix", out, "--tokenizer", "train-bpe:300", "--workers", "1", "--quiet"])
        == 0
    )
    assert "tokens/s" in capsys.readouterr().out
    meta = json.loads(open(out + ".meta.json").read())
    reloaded = load_tokenizer(meta["tokenizer_spec"])  # the BPE saved next to the data
    assert reloaded.fingerprint()["sha256"] == meta["tokenizer"]["sha256"] and reloaded.vocab_size == 300
    assert read_docs(out)[0] == reloaded.encode("sample text 0 " * 5) + [2]
    assert sorted(glob.glob(out + "*")) == sorted(out + s for s in (".bin", ".idx", ".meta.json", ".tokenizer.json"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_JSONL)
    assert (
        main(
            [
                "--input",
                str(bad),
                "--output-prefix",
                str(tmp_path / "x"),
                "--tokenizer",
                f"hf:{out}.tokenizer.json",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 2
    )
    assert "bad.jsonl:3" in capsys.readouterr().err
    assert leftovers(tmp_path, "x") == []


def _jsonl_with_one_bad_byte(path, n, bad_line):
    with open(path, "wb") as f:
        for i in range(1, n + 1):
            # the bad line holds one latin-1 byte (0xe9, "é"), which is not UTF-8
            f.write(b'{"text": "caf\xe9"}\n' if i == bad_line else b'{"text": "doc %d"}\n' % i)


def test_skip_bad_loses_only_the_bad_line_of_a_large_file(tmp_path, bpe_tok, capsys):
    src = tmp_path / "big.jsonl"
    _jsonl_with_one_bad_byte(src, 100_000, bad_line=54_321)
    with pytest.raises(MalformedInputError, match=r"big\.jsonl:54321: not valid UTF-8"):
        preprocess([str(src)], str(tmp_path / "strict"), bpe_tok, num_workers=1, progress=False)
    assert leftovers(tmp_path, "strict") == []
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "--input",
                str(src),
                "--output-prefix",
                out,
                "--tokenizer",
                bpe_tok.spec,
                "--workers",
                "2",
                "--skip-bad",
                "--quiet",
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out
    assert "wrote 99,999 documents" in summary
    assert f"1 malformed records skipped ({src}:54321); first: {src}:54321: not valid UTF-8" in summary
    docs = read_docs(out)
    assert len(docs) == 99_999
    assert docs[54_319] == expected(bpe_tok, ["doc 54320"])[0] and docs[54_320] == expected(bpe_tok, ["doc 54322"])[0]


@pytest.mark.parametrize("unit", ["line", "paragraph"])
def test_skip_bad_text_units_keep_the_good_lines(tmp_path, bpe_tok, unit):
    src = tmp_path / "mixed.txt"
    src.write_bytes(
        b"first para\nstill first\n\nbad \xff here\n\nthird\n"
        if unit == "paragraph"
        else b"good one\nbad \xff here\ngood two\r\ngood three"
    )
    report = preprocess(
        [str(src)], str(tmp_path / "out"), bpe_tok, text_unit=unit, skip_bad=True, num_workers=1, progress=False
    )
    good = ["first para\nstill first", "third\n"] if unit == "paragraph" else ["good one", "good two", "good three"]
    assert read_docs(str(tmp_path / "out")) == expected(bpe_tok, good)
    assert report.num_bad == 1 and report.bad_locations == [f"{src}:{4 if unit == 'paragraph' else 2}"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_mid_run_leaves_no_temp_files(tmp_path, bpe_tok, sig):
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "many.jsonl"
    src.write_text((json.dumps({"text": "a document of a few words " * 4}) + "\n") * 400_000)
    out = str(tmp_path / "out")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "latentforge.data.preprocess",
            "--input",
            str(src),
            "--output-prefix",
            out,
            "--tokenizer",
            bpe_tok.spec,
            "--workers",
            "2",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not glob.glob(out + ".bin.tmp-*") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "preprocessing ended before it could be interrupted: make the input larger"
    time.sleep(0.3)  # mid-write
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: no output written" in err, err
    assert "Traceback" not in err, err  # workers end quietly
    assert leftovers(tmp_path, "out") == []


def test_compressed_jsonl_is_read_line_by_line(tmp_path, bpe_tok):
    import gzip

    src = tmp_path / "part.jsonl.gz"
    with gzip.open(src, "wb") as f:
        f.write(b'{"text": "one"}\n{"text": "caf\xe9"}\n{"text": "three"}\n')
    report = preprocess([str(src)], str(tmp_path / "out"), bpe_tok, skip_bad=True, num_workers=1, progress=False)
    assert read_docs(str(tmp_path / "out")) == expected(bpe_tok, ["one", "three"])
    assert report.bad_locations == [f"{src}:2"]
