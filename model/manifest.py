"""Checkpoint integrity: `manifest.json` lists every file of a checkpoint with its size and SHA-256.

The trainer writes the manifest last, after every shard and DCP's `.metadata`, then renames the directory into
place: a checkpoint with a manifest is complete, and a file that no longer matches its entry (bit rot, a truncated
copy, random bytes) names the checkpoint as damaged before anything in it is unpickled or loaded. Hashing can be
split over ranks (`part=(rank, world_size)`): each checks the files whose sorted index falls to it.

DCP's `.metadata` is a pickle: the checksums prove a checkpoint is the one that was written, not that whoever
wrote it can be trusted. Load only checkpoints you (or someone you trust) wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from .errors import UserError

if TYPE_CHECKING:
    from torch.distributed.checkpoint import StorageReader

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


class CheckpointDamagedError(UserError):
    """A checkpoint's files do not match its manifest (or its metadata cannot be read); the message names the file."""


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(directory, names: Iterable[str]) -> Dict[str, dict]:
    """{name: {"size", "sha256"}} for the named files of `directory`."""
    directory = Path(directory)
    return {
        name: {"size": (directory / name).stat().st_size, "sha256": file_digest(directory / name)} for name in names
    }


def checkpoint_files(directory) -> List[str]:
    """Every regular file of a checkpoint directory (relative names, sorted), the manifest itself excluded."""
    directory = Path(directory)
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    )


def write_manifest(directory, entries: Dict[str, dict]) -> str:
    """Write `manifest.json` atomically (temporary file, fsync, rename)."""
    path = os.path.join(directory, MANIFEST_FILE)
    body = {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": dict(sorted(entries.items()))}
    with open(path + ".partial", "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".partial", path)
    return path


def has_manifest(directory) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


def read_manifest(directory) -> Dict[str, dict]:
    path = Path(directory) / MANIFEST_FILE
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
        return files
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointDamagedError(f"{path} is unreadable ({error}): the checkpoint {directory} is damaged") from None


def find_damage(directory, part: Tuple[int, int] = (0, 1)) -> List[str]:
    """Problems with this part of a checkpoint's files (empty: intact, or no manifest to check against)."""
    directory = Path(directory)
    if not has_manifest(directory):
        return []
    try:
        entries = read_manifest(directory)
    except CheckpointDamagedError as error:
        return [str(error)]
    index, count = part
    problems = []
    for position, (name, expected) in enumerate(sorted(entries.items())):
        if position % count != index:
            continue
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            problems.append(
                f"{path} has {size} bytes, the manifest says {expected.get('size')} (truncated or overwritten)"
            )
        elif file_digest(path) != expected.get("sha256"):
            problems.append(f"{path} fails its SHA-256 check (bit rot, or a damaged copy)")
    return problems


def damage_message(directory, problems: List[str]) -> str:
    more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
    return f"checkpoint {directory} is damaged: {problems[0]}{more}"


def verify_checkpoint(directory) -> None:
    """Raise CheckpointDamagedError naming the first damaged file; a checkpoint without a manifest (written by an
    older version, or by plain `dcp.save`) passes unchecked."""
    problems = find_damage(directory)
    if problems:
        raise CheckpointDamagedError(damage_message(directory, problems))


def read_dcp_metadata(directory: str | os.PathLike, reader: Optional[StorageReader] = None):
    """DCP's `.metadata` of a checkpoint; a file that does not unpickle is named in one line."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return (reader or FileSystemReader(str(directory))).read_metadata()
    except FileNotFoundError:
        raise CheckpointDamagedError(
            f"{Path(directory) / '.metadata'} is missing: {directory} is not a complete DCP checkpoint"
        ) from None
    except Exception as error:  # noqa: BLE001 - unpickling a damaged file raises anything
        raise CheckpointDamagedError(
            f"{Path(directory) / '.metadata'} cannot be read ({type(error).__name__}: "
            f"{error}): the checkpoint {directory} is damaged"
        ) from None
