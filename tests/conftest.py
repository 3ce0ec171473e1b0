"""Project-wide test setup: CPU by default, `gpu` tests skipped cleanly without CUDA, W&B never reaches out."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# tiny CPU models are bound by per-op overhead: one intra-op thread per process (spawned ranks and torchrun
# subprocesses inherit it) avoids oversubscribing the 2 cores, where 2 threads ran tiny GEMMs orders slower
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton reads this when triton.language is first imported, and any test module (transformers, lm-eval, the GPU
    # acceptance script) may import triton while being collected, before tests/kernels/conftest.py runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# numerics: tests whose pass depends on floating-point summation order (references, layouts against one
# process, HF parity, decoding against a full forward). CI runs them a second time under another
# ATEN_CPU_CAPABILITY so a tolerance tuned to one CPU's vector width fails here, not on a user's machine.
NUMERICS_MODULES = (
    "tests/kernels/test_ssd_ref.py",
    "tests/kernels/test_conv1d_ref.py",
    "tests/kernels/test_moe_ref.py",
    "tests/kernels/test_rmsnorm_ref.py",
    "tests/kernels/test_cross_entropy_ref.py",
    "tests/model/test_model.py",
    "tests/model/test_hf.py",
    "tests/train/test_parallel_equivalence.py",
    "tests/train/test_parallel_single.py",
    "tests/model/test_engine.py",
    "tests/rl/test_trainer_parallel.py",
)


def pytest_collection_modifyitems(config, items):
    numerics = pytest.mark.numerics
    for item in items:
        if str(item.path.relative_to(config.rootpath)) in NUMERICS_MODULES:
            item.add_marker(numerics)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
