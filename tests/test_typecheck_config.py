"""pyright's view of the package: tools/pyright-root/latentforge/ mirrors pyproject's package-dir mapping."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK_ROOT = ROOT / "tools" / "pyright-root"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_mapped_folder_has_one_link_to_it_and_nothing_else_is_linked():
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    expected = {name.removeprefix("latentforge."): ROOT / folder for name, folder in mapping.items()}
    links = {p.name: p for p in (LINK_ROOT / "latentforge").iterdir()}
    assert sorted(links) == sorted(expected), (
        f"tools/pyright-root/latentforge has {sorted(links)}, package-dir maps {sorted(expected)}: add or remove "
        f"the symlink (ln -s ../../../FOLDER tools/pyright-root/latentforge/NAME)"
    )
    for name, link in links.items():
        assert link.is_symlink(), f"{link.relative_to(ROOT)} must be a symlink, not a copy"
        assert not Path(link.readlink()).is_absolute(), f"{link.relative_to(ROOT)} must be relative to work in a clone"
        assert link.resolve() == expected[name].resolve(), f"{link.relative_to(ROOT)} -> {link.resolve()}"


def test_pyright_reads_the_link_tree_and_checks_only_existing_paths():
    config = _pyproject()["tool"]["pyright"]
    assert config["extraPaths"] == ["tools/pyright-root"]
    assert config["include"], "an empty include makes pyright check the whole tree"
    for entry in config["include"]:
        assert entry.startswith("tools/pyright-root/latentforge/"), (
            f"{entry}: name checked files through the link tree, or pyright sees two modules per file"
        )
        assert (ROOT / entry).exists(), f"pyright include {entry} does not exist"


def test_pyright_checks_every_package_whole():
    """Each mapped folder is in pyright's include as a whole, so a module added to one is checked from its first
    commit (no per-file list to forget)."""
    include = _pyproject()["tool"]["pyright"]["include"]
    packages = [f"tools/pyright-root/latentforge/{link.name}" for link in (LINK_ROOT / "latentforge").iterdir()]
    assert sorted(include) == sorted(packages), f"pyright include {include} should be exactly {sorted(packages)}"
