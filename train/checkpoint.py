"""Atomic, rotating `torch.distributed.checkpoint` (DCP) checkpoints.

Layout: `<folder>/step_00000100/` (complete) and `<folder>/step_00000100.tmp/` (being written). Every rank writes
its shards into the temporary directory; when DCP's collective save returns (its metadata file is written last,
after every rank reported), rank 0 renames the directory to its final name, which is atomic on POSIX file systems.
Only then are checkpoints beyond the newest `keep_last` deleted, so a crash at any moment of a save leaves the
previous checkpoint complete and loadable; leftover `.tmp` directories are ignored and cleaned by the next save.

State entries may be tensors, nested dicts of tensors, `Stateful` objects (model, optimizer), or opaque `bytes`
blobs (`pack` / `unpack`) for per-rank Python state (data-loader position, RNG) whose structure DCP need not know.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from latentforge.model.hf import STEP_DIR, complete_checkpoints  # noqa: F401 - the one definition of a complete checkpoint

from . import distributed as world

TMP_SUFFIX = ".tmp"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def pack(obj) -> bytes:
    """Python state (may hold tensors) -> one opaque blob, saved as a single DCP entry."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def unpack(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=False)


def latest_checkpoint(folder: str) -> Optional[str]:
    found = complete_checkpoints(folder)
    return found[-1][1] if found else None


def checkpoint_keys(path: str) -> set:
    """Top-level entry names stored in a checkpoint (e.g. model, optimizer, trainer, rng_rank0)."""
    metadata = FileSystemReader(path).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


@contextlib.contextmanager
def quiet_single_process():
    # DCP warns on every single-process save/load even when asked for one (no_dist=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        yield


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """`save(step, state)` atomically into `folder`, keep the newest `keep_last`; `load(path, state)`."""

    def __init__(self, folder: str, keep_last: int = 2, async_save: bool = False):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.folder = os.path.abspath(folder)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending = None  # (future, tmp path, final path) of an async save in flight
        self._async_group = None

    # ----- saving --------------------------------------------------------------------------------------------
    def save(self, step: int, state: dict, write_extra: Optional[Callable[[str], None]] = None) -> str:
        """Collective: every rank calls it with its own `state`. `write_extra(tmp_dir)` runs on rank 0 before the
        shards are written (human-readable config and summary files). Returns the final path."""
        self.wait()
        final = os.path.join(self.folder, step_dir_name(step))
        tmp = final + TMP_SUFFIX
        if world.rank() == 0:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
            if write_extra is not None:
                write_extra(tmp)
        world.barrier()
        no_dist = not world.is_distributed()
        if self.async_save:
            with quiet_single_process():
                future = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group(), no_dist=no_dist)
            self._pending = (future, tmp, final)
        else:
            with quiet_single_process():
                dcp.save(state, checkpoint_id=tmp, no_dist=no_dist)
            self._finalize(tmp, final)
            world.barrier()
        return final

    def _group(self):
        # async saves run their collectives from a background thread: they need a group of their own, on gloo,
        # or they would interleave with the training step's collectives
        if self._async_group is None and world.is_distributed():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _finalize(self, tmp: str, final: str):
        """Rank 0, after every rank's shards and the metadata are on disk: publish, then rotate."""
        if world.rank() != 0:
            return
        if os.path.exists(final):  # the same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        self._rotate(keep=final)

    def _rotate(self, keep: str):
        complete = complete_checkpoints(self.folder)
        for _, path in complete[:-self.keep_last]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
        in_flight = self._pending[1] if self._pending is not None else None
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name.endswith(TMP_SUFFIX) and path != in_flight:  # left by a crash mid-save
                shutil.rmtree(path, ignore_errors=True)

    def poll(self):
        """Between steps: publish a finished async save without waiting for one still being written."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self):
        """Block until an async save in flight is written and published (no-op for synchronous saves)."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        future.result()
        self._pending = None
        # rank 0's save returns only after the coordinator gathered every rank and wrote the metadata
        self._finalize(tmp, final)

    def close(self):
        self.wait()

    # ----- loading -------------------------------------------------------------------------------------------
    def latest(self) -> Optional[str]:
        return latest_checkpoint(self.folder)

    @staticmethod
    def load(path: str, state: dict) -> set:
        """Load into `state` (in place; `Stateful` values get `load_state_dict`) the entries the checkpoint has.

        Returns the names in `state` that the checkpoint does not hold (e.g. the RNG of a rank that did not exist
        under the saved layout); the caller decides whether that is fine."""
        stored = checkpoint_keys(path)
        missing = {key for key in state if key not in stored}
        present = {key: value for key, value in state.items() if key in stored}
        with quiet_single_process():
            dcp.load(present, checkpoint_id=path, no_dist=not world.is_distributed())
        for key, value in present.items():
            state[key] = value
        return missing
