"""The project's top-level packages must not shadow distributions that torch / transformers look for."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ["model", "kernels", "data", "train", "rl", "launch"]


@pytest.mark.parametrize("name", OUR_PACKAGES)
def test_top_level_package_is_ours(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.fail(f"package {name!r} is not importable: run `pip install -e .`")
    origin = Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
    assert ROOT in origin.parents, f"{name!r} resolves to {origin}, not this repository"
    owners = importlib.metadata.packages_distributions().get(name, [])
    assert set(owners) <= {"latentforge"}, f"{name!r} is also provided by {owners}"


def test_transformers_does_not_mistake_our_kernels_for_hf_kernels():
    # transformers probes an optional `kernels` distribution (Hugging Face hub kernels) by import name
    from transformers.utils import import_utils

    assert not import_utils.is_kernels_available()


def test_recipes_ship_with_the_package():
    from model.recipes import RECIPES_DIR

    assert (RECIPES_DIR / "config.yaml").is_file()
