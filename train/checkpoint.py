"""Atomic, rotating `torch.distributed.checkpoint` (DCP) checkpoints.

Layout: `<folder>/step_00000100/` (complete) and `<folder>/step_00000100.tmp/` (being written). Every rank writes
its shards into the temporary directory; when DCP's collective save returns (its metadata file is written last,
after every rank reported), rank 0 renames the directory to its final name, which is atomic on POSIX file systems.
Only then are checkpoints beyond the newest `keep_last` deleted, so a crash at any moment of a save leaves the
previous checkpoint complete and loadable; leftover `.tmp` directories are ignored and cleaned by the next save.

Integrity: before the rename, every rank hashes the shard files it wrote and rank 0 writes `manifest.json` (size and
SHA-256 of every file, model/manifest.py) last. `newest_intact()` checks the checksums (split over the ranks) and
skips a damaged checkpoint with a loud warning, moving it aside as `step_XXXXXXXX.damaged`. DCP's `.metadata` is a
pickle and so are the `pack`ed blobs' containers: blobs load with `weights_only=True`, but only load checkpoints
from a source you trust.

State entries may be tensors, nested dicts of tensors, `Stateful` objects (model, optimizer), or opaque `bytes`
blobs (`pack` / `unpack`) for per-rank Python state (data-loader position, RNG) whose structure DCP need not know.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import time
import warnings
from concurrent.futures import Future
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from latentforge.model.hf import STEP_DIR, complete_checkpoints  # noqa: F401 - the one definition of a complete checkpoint
from latentforge.model.manifest import (
    CheckpointDamagedError,
    checkpoint_files,
    damage_message,
    find_damage,
    hash_files,
    read_dcp_metadata,
    write_manifest,
)

from . import distributed as world

TMP_SUFFIX = ".tmp"
DAMAGED_SUFFIX = ".damaged"
HASHES_PART = ".sha256_rank{}.json"  # one rank's shard checksums, merged into the manifest by rank 0
PART_WAIT_S = 600.0  # async saves: how long rank 0 waits for the other ranks' shard checksums


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


_NUMPY = "__numpy__"
_DATACLASS = "__dataclass__"
_OWN_MODULES = "latentforge."  # the only dataclasses a blob may rebuild (e.g. GRPO's buffered groups)


def _to_loadable(obj):
    """numpy arrays and scalars -> tensors and Python numbers, our dataclasses -> tagged dicts, so that
    `weights_only=True` can load the blob."""
    import dataclasses

    import numpy as np

    if isinstance(obj, np.ndarray):
        return {_NUMPY: torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith(_OWN_MODULES):
            raise TypeError(f"pack: {cls.__module__}.{cls.__qualname__} is not a LatentForge dataclass")
        return {
            _DATACLASS: f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f.name: _to_loadable(getattr(obj, f.name)) for f in dataclasses.fields(obj)},
        }
    if isinstance(obj, dict):
        return {key: _to_loadable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_loadable(value) for value in obj)
    return obj


def _from_loadable(obj):
    if isinstance(obj, dict):
        if set(obj) == {_NUMPY}:
            return obj[_NUMPY].numpy()
        if set(obj) == {_DATACLASS, "fields"}:
            return _own_dataclass(obj[_DATACLASS])(**_from_loadable(obj["fields"]))
        return {key: _from_loadable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_loadable(value) for value in obj)
    return obj


def _own_dataclass(name: str):
    import dataclasses
    import importlib

    module, _, qualname = name.partition(":")
    if not module.startswith(_OWN_MODULES):
        raise ValueError(f"a checkpoint blob names {name}: only LatentForge dataclasses are rebuilt")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"a checkpoint blob names {name}, which is not a dataclass")
    return cls


def pack(obj) -> bytes:
    """Python state (plain containers, numbers, strings, tensors, numpy arrays) -> one opaque blob, saved as a single
    DCP entry."""
    buffer = io.BytesIO()
    torch.save(_to_loadable(obj), buffer)
    return buffer.getvalue()


def unpack(blob: bytes) -> Any:
    """What `pack` was given (any of the value kinds it takes: the caller knows which)."""
    # weights_only: a blob holds data, never code to run
    return _from_loadable(torch.load(io.BytesIO(blob), weights_only=True))


def latest_checkpoint(folder: str) -> Optional[str]:
    found = complete_checkpoints(folder)
    return found[-1][1] if found else None


def checkpoint_keys(path: str) -> set:
    """Top-level entry names stored in a checkpoint (e.g. model, optimizer, trainer, rng_rank0)."""
    metadata = read_dcp_metadata(path, FileSystemReader(path))
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def _write_shard_hashes(tmp: str, rank: int) -> None:
    """This rank's shard files (DCP names them `__<rank>_<n>.distcp`) -> their checksums, for rank 0's manifest."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(tmp, f"__{rank}_*")))
    part = os.path.join(tmp, HASHES_PART.format(rank))
    with open(part + ".partial", "w") as f:
        json.dump(hash_files(tmp, names), f)
    os.replace(part + ".partial", part)


def _collect_shard_hashes(tmp: str, world_size: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    parts = [os.path.join(tmp, HASHES_PART.format(r)) for r in range(world_size)]
    while not all(os.path.isfile(p) for p in parts):
        if time.monotonic() > deadline:
            missing = [p for p in parts if not os.path.isfile(p)]
            raise RuntimeError(
                f"checkpoint {tmp}: no shard checksums from {len(missing)} rank(s) after "
                f"{timeout_s:.0f}s ({missing[0]} ...); the checkpoint is left unpublished"
            )
        time.sleep(0.05)
    entries = {}
    for path in parts:
        with open(path) as f:
            entries.update(json.load(f))
        os.remove(path)
    return entries


def write_checkpoint_manifest(tmp: str, world_size: int, timeout_s: float = PART_WAIT_S) -> None:
    """Rank 0: the ranks' shard checksums plus its own of every other file -> manifest.json, written last."""
    entries = _collect_shard_hashes(tmp, world_size, timeout_s)
    rest = [name for name in checkpoint_files(tmp) if name not in entries]
    entries.update(hash_files(tmp, rest))
    write_manifest(tmp, entries)


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
        self._pending: Optional[tuple[Future, str, str]] = None  # (future, tmp path, final path) of a save in flight
        self._async_group: Optional[dist.ProcessGroup] = None

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
        rank = world.rank()
        if self.async_save:
            with quiet_single_process():
                response = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group(), no_dist=no_dist)
            # a Future without an async stager (here); newer torch wraps it in an AsyncSaveResponse with a stager
            future = response if isinstance(response, Future) else response.upload_completion
            # hashed in DCP's background thread once this rank's shards are written: rank 0 may wait for it
            # without waiting on the other ranks' training loops
            future.add_done_callback(lambda done: done.exception() is None and _write_shard_hashes(tmp, rank))
            self._pending = (future, tmp, final)
        else:
            with quiet_single_process():
                dcp.save(state, checkpoint_id=tmp, no_dist=no_dist)
            _write_shard_hashes(tmp, rank)
            world.barrier()
            self._finalize(tmp, final)
            world.barrier()
        return final

    def _group(self) -> Optional[dist.ProcessGroup]:
        # async saves run their collectives from a background thread: they need a group of their own, on gloo,
        # or they would interleave with the training step's collectives
        if self._async_group is None and world.is_distributed():
            group = dist.new_group(backend="gloo")
            assert isinstance(group, dist.ProcessGroup)  # every rank is a member, so not GroupMember.NON_GROUP_MEMBER
            self._async_group = group
        return self._async_group

    def _finalize(self, tmp: str, final: str):
        """Rank 0, after every rank's shards and the metadata are on disk: publish, then rotate."""
        if world.rank() != 0:
            return
        write_checkpoint_manifest(tmp, world.world_size())
        if os.path.exists(final):  # the same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        self._rotate(keep=final)

    def _rotate(self, keep: str):
        complete = complete_checkpoints(self.folder)
        for _, path in complete[: -self.keep_last]:
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
        """The newest complete checkpoint, unverified (see `newest_intact`)."""
        return latest_checkpoint(self.folder)

    def newest_intact(self, strict: bool = False, warn: Optional[Callable[[str], None]] = None) -> Optional[str]:
        """Collective: the newest checkpoint whose files match their manifest (None: there is none).

        A damaged one is reported through `warn` and moved aside (`step_XXXXXXXX.damaged`, kept for inspection);
        with `strict` it raises CheckpointDamagedError instead. When every checkpoint is damaged this raises too:
        silently starting over would discard the run."""
        candidates = [path for _, path in reversed(complete_checkpoints(self.folder))]
        damaged = []
        for path in candidates:
            problems = find_damage_on_all_ranks(path)
            if not problems:
                if damaged and warn is not None:
                    warn(f"WARNING: resuming from {path}, the newest intact checkpoint")
                return path
            message = damage_message(path, problems)
            if strict:
                raise CheckpointDamagedError(
                    f"{message}. train.strict_resume=true: stopping. Set it to false to "
                    "fall back to the newest intact checkpoint"
                )
            damaged.append(message)
            if warn is not None:
                warn(
                    f"WARNING: {message}; moving it aside to {path}{DAMAGED_SUFFIX} and falling back to an older "
                    "checkpoint"
                )
            if world.rank() == 0:
                os.replace(path, path + DAMAGED_SUFFIX)
            world.barrier()
        if damaged:
            raise CheckpointDamagedError(
                f"every checkpoint in {self.folder} is damaged ({damaged[0]}); restore "
                "one from a copy, or start over with train.resume=false train.overwrite=true"
            )
        return None

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


def find_damage_on_all_ranks(path: str) -> List[str]:
    """Collective: the checkpoint's damaged files, each rank checking its share of them; the same list on every rank."""
    mine = find_damage(path, part=(world.rank(), world.world_size()))
    return sorted(problem for part in world.all_gather_object(mine) for problem in part)
