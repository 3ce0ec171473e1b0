"""Checkpoints prove their integrity: the manifest catches bit flips, random bytes, truncation and a damaged
`.metadata`; resume falls back to the newest intact checkpoint (or stops when strict); blobs never run code."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from latentforge.model.manifest import MANIFEST_FILE, CheckpointDamagedError, find_damage, verify_checkpoint
from latentforge.train.checkpoint import CheckpointManager, checkpoint_keys, complete_checkpoints, pack, unpack


def state(value: float) -> dict:
    return {
        "model": {"w": torch.full((64, 64), value), "b": torch.arange(16, dtype=torch.float32) * value},
        "trainer": pack({"step": int(value)}),
    }


def saved_steps(folder, steps=(1, 2, 3), keep_last=3) -> CheckpointManager:
    manager = CheckpointManager(str(folder), keep_last=keep_last)
    for step in steps:
        manager.save(step, state(float(step)))
    return manager


def shard_of(path: str) -> str:
    return next(os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".distcp"))


def flip_bit(path: str, offset: int = 200) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_the_manifest_lists_every_file_with_its_real_checksum(tmp_path):
    manager = saved_steps(tmp_path, steps=(5,))
    path = manager.latest()
    manifest = json.load(open(os.path.join(path, MANIFEST_FILE)))
    on_disk = sorted(n for n in os.listdir(path) if n != MANIFEST_FILE)
    assert sorted(manifest["files"]) == on_disk and ".metadata" in on_disk
    for name, entry in manifest["files"].items():  # against hashlib, independently of the code under test
        data = open(os.path.join(path, name), "rb").read()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not [n for n in os.listdir(path) if n.startswith(".sha256_rank")]  # the per-rank parts are merged
    verify_checkpoint(path)


def test_async_saves_get_a_manifest_too(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2, async_save=True)
    manager.save(1, state(1.0))
    manager.wait()
    assert os.path.isfile(os.path.join(manager.latest(), MANIFEST_FILE)) and find_damage(manager.latest()) == []


@pytest.mark.parametrize("damage", ["bit_flip", "random_bytes", "truncated", "metadata"])
def test_damage_is_named_and_resume_falls_back_to_the_newest_intact(tmp_path, damage):
    manager = saved_steps(tmp_path)
    newest = manager.latest()
    target = os.path.join(newest, ".metadata") if damage == "metadata" else shard_of(newest)
    if damage in ("bit_flip", "metadata"):
        flip_bit(target, offset=os.path.getsize(target) // 2)
    elif damage == "random_bytes":
        size = os.path.getsize(target)
        with open(target, "wb") as f:
            f.write(np.random.default_rng(0).bytes(size))
    else:
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)

    problems = find_damage(newest)
    assert len(problems) == 1 and problems[0].startswith(target)
    with pytest.raises(CheckpointDamagedError, match=f"checkpoint {newest} is damaged: {target}"):
        verify_checkpoint(newest)

    warnings = []
    intact = manager.newest_intact(warn=warnings.append)
    assert intact == os.path.join(str(tmp_path), "step_00000002")
    assert "WARNING" in warnings[0] and target in warnings[0] and intact in warnings[-1]
    assert os.path.isdir(newest + ".damaged")  # kept for inspection, no longer a candidate
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [1, 2]
    loaded = {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(16)}}
    CheckpointManager.load(intact, loaded)
    assert torch.equal(loaded["model"]["w"], torch.full((64, 64), 2.0))


def test_strict_resume_stops_at_a_damaged_checkpoint(tmp_path):
    manager = saved_steps(tmp_path)
    flip_bit(shard_of(manager.latest()))
    with pytest.raises(CheckpointDamagedError, match="strict_resume=true"):
        manager.newest_intact(strict=True)
    assert manager.latest().endswith("step_00000003")  # nothing moved


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    manager = saved_steps(tmp_path, steps=(1, 2))
    for _, path in complete_checkpoints(str(tmp_path)):
        flip_bit(shard_of(path))
    with pytest.raises(CheckpointDamagedError, match="every checkpoint in .* is damaged"):
        manager.newest_intact()


def test_a_damaged_metadata_without_manifest_is_named_in_one_line(tmp_path):
    manager = saved_steps(tmp_path, steps=(1,))
    path = manager.latest()
    os.remove(os.path.join(path, MANIFEST_FILE))  # as plain dcp.save or an older version writes it
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(b"\x80\x04not a pickle at all")
    with pytest.raises(CheckpointDamagedError, match=rf"{path}/\.metadata cannot be read"):
        checkpoint_keys(path)


def test_hf_export_refuses_a_damaged_checkpoint(tmp_path):
    from latentforge.model.hf import load_dcp_checkpoint

    def write_config(directory):
        with open(os.path.join(directory, "model_config.json"), "w") as f:
            f.write('{"hidden_size": 64}')

    path = CheckpointManager(str(tmp_path)).save(1, state(1.0), write_extra=write_config)
    with open(os.path.join(path, "model_config.json"), "w") as f:
        f.write("{}")  # a file the manifest covers, changed after the save
    with pytest.raises(CheckpointDamagedError, match="model_config.json has"):
        load_dcp_checkpoint(path)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_blobs_load_weights_only(tmp_path):
    rng = np.random.RandomState(3)
    value = {"numpy": rng.get_state(), "ints": np.int64(7), "nested": [(1, "a"), {"t": torch.ones(2)}]}
    back = unpack(pack(value))
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], value["numpy"][1])
    assert back["numpy"][1].dtype == value["numpy"][1].dtype and back["ints"] == 7
    assert back["nested"][0] == (1, "a") and torch.equal(back["nested"][1]["t"], torch.ones(2))
    restored = np.random.RandomState()
    restored.set_state(back["numpy"])
    assert restored.randint(0, 1 << 30) == np.random.RandomState(3).randint(0, 1 << 30)

    from latentforge.rl.buffer import Group, Sample

    group = unpack(pack({"ready": [Group(3, [])]}))["ready"][0]  # GRPO's buffered groups travel as dataclasses
    assert isinstance(group, Group) and group.group_id == 3 and group.samples == []
    assert Sample.__module__.startswith("latentforge.")

    crafted = pickle.dumps(RunsCode())
    import io

    buffer = io.BytesIO()
    torch.save({"x": 1}, buffer)  # a real torch archive whose data pickle is swapped for one that runs code
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, crafted if item.filename.endswith("data.pkl") else src.read(item))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        unpack(out.getvalue())
