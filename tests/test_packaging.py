"""Packaging: one `latentforge` namespace that shadows nothing, in editable installs and in a wheel run anywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["model", "kernels", "data", "train", "rl", "launch"]
SHIPPED = {"launch": ("*.sh", "*.sbatch"), "recipes": ("*.yaml",)}  # data folders: listed, or not in the wheel


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_python_folder_is_a_listed_package():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    for top in [*FOLDERS, "recipes"]:
        for folder in [ROOT / top, *sorted(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            patterns = ("*.py", *SHIPPED.get(top, ()))
            if "__pycache__" in folder.parts or not any(any(folder.glob(g)) for g in patterns):
                continue
            name = "latentforge." + ".".join(folder.relative_to(ROOT).parts)
            assert name in listed, (
                f"{folder.relative_to(ROOT)} holds Python or data files but {name} is not in pyproject.toml"
            )


def test_hf_kernels_is_not_shadowed_and_ours_lives_in_the_namespace():
    # the repository root is on sys.path here (pytest's rootdir); `kernels/` has no __init__.py so that a regular
    # package of the same name (Hugging Face's, which transformers imports) wins
    pytest.importorskip("transformers")
    import kernels

    assert Path(kernels.__file__).resolve().parent != ROOT / "kernels", f"`import kernels` found {kernels.__file__}"
    assert "site-packages" in Path(kernels.__file__).parts, kernels.__file__
    from transformers.integrations import hub_kernels  # noqa: F401 - raised ImportError while ours shadowed it

    from latentforge.kernels.ssd import ssd_scan_ref

    assert callable(ssd_scan_ref)


def test_a_users_own_modules_in_cwd_do_not_change_what_latentforge_imports(tmp_path):
    (tmp_path / "data.py").write_text("raise RuntimeError('the user data.py was imported')\n")
    (tmp_path / "model.py").write_text("raise RuntimeError('the user model.py was imported')\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "__init__.py").write_text("raise RuntimeError('the user train/ was imported')\n")
    code = (
        "import latentforge.data.tokenizer as t, latentforge.model.hybrid as m, latentforge.train.trainer as tr\n"
        "print(t.__file__); print(m.__file__); print(tr.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in out.stdout.split():
        assert tmp_path not in Path(line).resolve().parents, line
    # `python -m` puts the cwd first on sys.path as well
    out = subprocess.run(
        [sys.executable, "-m", "latentforge.model.params", "recipe=tiny"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "total" in out.stdout.lower()


FLAT_IMPORT = re.compile(rf"^\s*(from|import)\s+({'|'.join(FOLDERS)})(\.|\s)", re.M)
FLAT_MODULE = re.compile(rf"(python|torchrun) -m ({'|'.join(FOLDERS)})\.")


def test_no_flat_import_names_remain():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    offenders = []
    for name in tracked:
        if name == "tests/test_packaging.py" or not name.endswith((".py", ".md", ".sh", ".sbatch", ".yaml")):
            continue
        text = (ROOT / name).read_text(errors="replace")
        for pattern in (FLAT_IMPORT, FLAT_MODULE):
            offenders += [f"{name}: {m.group(0).strip()}" for m in pattern.finditer(text)]
    assert not offenders, "old flat import names:\n" + "\n".join(offenders[:20])


def test_no_sys_path_edits():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    pattern = re.compile(r"sys\.path(\.insert|\.append|\[\d*\]\s*=|\s*=)")
    offenders = [n for n in tracked if n != "tests/test_packaging.py" and pattern.search((ROOT / n).read_text())]
    assert not offenders, offenders


@pytest.mark.slow
def test_a_built_wheel_runs_from_any_directory(tmp_path):
    """`pip wheel .` of a clean checkout, installed (not editable) into a fresh venv; entry points run elsewhere."""
    src = tmp_path / "src"
    src.mkdir()
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    subprocess.run(["tar", "-cf", str(tmp_path / "src.tar"), *files], cwd=ROOT, check=True)
    subprocess.run(["tar", "-xf", str(tmp_path / "src.tar")], cwd=src, check=True)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(wheels)],
        cwd=src,
        check=True,
        capture_output=True,
    )
    wheel = next(wheels.glob("latentforge-*.whl"))

    # a fresh venv that sees this environment's dependencies (not its editable latentforge: a .pth line adds a
    # plain path, whose own .pth files, the editable finder among them, are not run)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = Path(sysconfig.get_paths()["purelib"])
    bindir = venv / "bin"
    py = bindir / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True
    )
    # only now: pip would otherwise see (and uninstall) this environment's editable latentforge
    (site / "deps.pth").write_text(f"{purelib}\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    where = subprocess.run(
        [py, "-c", "import latentforge.model.recipes as r; print(r.__file__, r.RECIPES_DIR)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(site) in where and str(ROOT) not in where, where

    params = subprocess.run(
        [bindir / "latentforge-params", "recipe=super_120b"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert params.returncode == 0, params.stderr[-3000:]
    assert "123,611,033,088" in params.stdout, params.stdout

    train = subprocess.run(
        [bindir / "latentforge-pretrain", "recipe=tiny", "train.steps=2"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, (train.stdout[-2000:], train.stderr[-3000:])
    assert (work / "runs").is_dir(), "the run directory is made relative to the working directory"
