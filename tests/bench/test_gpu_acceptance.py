"""bench/gpu_acceptance.py's control flow on CPU: every part reports ok / skipped-with-reason / failed, one failing
part does not hide the others, and nothing it imports needs a module the lent GPU machine lacks."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_acceptance.py"
# absent on the lent GPU machine (or optional): the acceptance run must not import any of them
MISSING_THERE = (
    "hydra",
    "omegaconf",
    "ray",
    "megatron",
    "megatron.core",
    "datasets",
    "wandb",
    "mistral_common",
    "transformer_engine",
    "mamba_ssm",
    "causal_conv1d",
)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def only_report(out: Path) -> dict:
    reports = list(out.glob("gpu_acceptance_*.json"))
    assert len(reports) == 1, reports
    assert reports[0].with_suffix(".md").exists()
    return json.loads(reports[0].read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (no CUDA) report")
def test_tiny_run_without_the_modules_missing_on_the_gpu_machine(tmp_path):
    blocker = textwrap.dedent(f"""
        import runpy, sys
        for name in {MISSING_THERE!r}:
            sys.modules[name] = None  # `import name` now raises ImportError
        sys.argv = ["gpu_acceptance.py", "--tiny", "--out", {str(tmp_path)!r}, "--budget-s", "300"]
        runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = only_report(tmp_path)
    parts = report["parts"]
    assert report["mode"] == "tiny"
    assert {name: e["status"] for name, e in parts.items()} == {
        "environment": "ok",
        "gpu_tests": "skipped",
        "kernels": "ok",
        "train_bf16": "ok",
        "train_fp8": "skipped",
        "decode": "ok",
    }
    assert "no CUDA device" in parts["gpu_tests"]["reason"] and "test_ssd_triton.py" in parts["gpu_tests"]["reason"]
    assert "Transformer Engine" in parts["train_fp8"]["reason"]
    kernels = parts["kernels"]["result"]
    assert "Triton kernels not run" in kernels["note"]
    assert sorted(r["op"] for r in kernels["results"]) == sorted(
        ["ssd", "conv1d", "gated_rmsnorm", "moe_experts", "linear_ce", "cp_attention"]
    )
    # fp32 reference against fp64: small but not exactly zero (a real comparison ran)
    assert all(0 < r["relative_error"] < 1e-5 for r in kernels["results"])
    ssd = next(r for r in kernels["results"] if r["op"] == "ssd")
    assert "not importable" in ssd["impls"]["mamba_ssm"]["skipped"]
    train = parts["train_bf16"]["result"]
    assert train["tokens_per_s"] > 0 and train["mfu"] is None and torch.isfinite(torch.tensor(train["loss"]))
    rows = parts["decode"]["result"]["rows"]
    assert [(r["batch"], r["draft_tokens"]) for r in rows] == [(b, k) for b in (1, 8) for k in range(4)]
    assert all(r["greedy_output_identical"] for r in rows if r["draft_tokens"])
    markdown = next(tmp_path.glob("*.md")).read_text()
    assert "| gpu_tests | SKIPPED |" in markdown and "| train_fp8 | SKIPPED |" in markdown


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    script = load_script()

    def broken(args):
        raise ValueError("planted failure")

    monkeypatch.setitem(script.PART_FUNCTIONS, "kernels", broken)
    code = script.main(["--tiny", "--parts", "kernels", "train_fp8", "--out", str(tmp_path)])
    assert code == 1
    parts = only_report(tmp_path)["parts"]
    assert list(parts) == ["environment", "kernels", "train_fp8"]
    assert parts["kernels"]["status"] == "failed" and "planted failure" in parts["kernels"]["error"]
    assert parts["environment"]["status"] == "ok"
    assert parts["train_fp8"]["status"] in ("skipped", "ok")
    assert "## kernels failed" in next(tmp_path.glob("*.md")).read_text()


def test_parts_past_the_budget_are_skipped(tmp_path):
    script = load_script()
    assert script.main(["--tiny", "--budget-s", "0", "--parts", "decode", "--out", str(tmp_path)]) == 0
    parts = only_report(tmp_path)["parts"]
    assert parts["decode"] == {"status": "skipped", "reason": "the time budget is spent", "seconds": 0.0}


def test_run_pytest_counts_passes_failures_and_skips(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_passes():
            assert 1 + 1 == 2

        @pytest.mark.gpu
        def test_fails():
            assert 1 + 1 == 3

        @pytest.mark.gpu
        @pytest.mark.skip(reason="planted skip")
        def test_skipped():
            pass

        def test_unmarked_not_collected():
            assert False
    """)
    )
    result = load_script().run_pytest(["test_sample.py"], tmp_path, timeout_s=120)
    assert (result["passed"], result["failures"], result["errors"], result["skipped"]) == (1, 1, 0, 1)
    assert result["failed"] == ["test_sample::test_fails"]
    assert result["skipped_reasons"] == {"planted skip": 1}
    assert "test_fails" in result["output_tail"]


def test_gpu_test_files_finds_the_marked_files():
    files = load_script().gpu_test_files(ROOT)
    assert "tests/kernels/test_ssd_triton.py" in files
    assert "tests/kernels/test_ssd_ref.py" not in files
