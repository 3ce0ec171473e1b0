"""Blended pretraining batches: format, masks, determinism, resume (across a change of DP size), blends, splits."""

import os

import numpy as np
import pytest
import torch

from latentforge.data.config import DataConfig
from latentforge.data.pretrain import build_pretrain_loader
from latentforge.data.tokenizer import load_tokenizer
from tests.data.conftest import megatron_write, random_documents

SEQ = 24


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, cache_dir):
    """Source A draws tokens from [100, 400), source B from [400, 700); every document starts with a unique tag."""
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    a = megatron_write(str(root / "a"), random_documents(rng, 80, 100, 400, tag_base=700))
    b = megatron_write(str(root / "b"), random_documents(rng, 60, 400, 700, tag_base=800))
    return a, b


def loader(paths, tok, mbs=4, dp_rank=0, dp_size=1, seed=None, split="train", **cfg):
    cfg.setdefault("split", "90,10,0")
    return build_pretrain_loader(
        DataConfig(paths=list(paths), **cfg),
        tok,
        seq_len=SEQ,
        micro_batch_size=mbs,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        split=split,
    )


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_format_masks_and_seq_idx_against_naive_loop(two_sources, bpe_tok):
    plain = loader(two_sources, bpe_tok, reset_at_documents=False, mask_document_end_labels=False)
    masked = loader(two_sources, bpe_tok, reset_at_documents=True)  # masks labels after </s> by default
    for raw, batch in zip(take(plain, 5), take(masked, 5)):
        assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
        assert batch["seq_idx"].dtype == torch.int32
        assert batch["input_ids"].shape == batch["labels"].shape == batch["seq_idx"].shape == (4, SEQ)
        assert (raw["seq_idx"] == 0).all()
        assert torch.equal(raw["input_ids"], batch["input_ids"])
        assert torch.equal(raw["labels"][:, :-1], raw["input_ids"][:, 1:])  # the labels are the next tokens
        for x, y_raw, y, s in zip(
            raw["input_ids"].tolist(), raw["labels"].tolist(), batch["labels"].tolist(), batch["seq_idx"].tolist()
        ):
            doc = 0
            for t in range(SEQ):  # naive reference: documents counted token by token
                assert s[t] == doc
                assert y[t] == (-100 if x[t] == 2 else y_raw[t])
                if x[t] == 2:
                    doc += 1


def test_deterministic_given_seed(two_sources, bpe_tok):
    a = take(loader(two_sources, bpe_tok, seed=7), 3)
    b = take(loader(two_sources, bpe_tok, seed=7), 3)
    c = take(loader(two_sources, bpe_tok, seed=8), 3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_resume_equals_uninterrupted_across_dp_change(two_sources, bpe_tok):
    ref_loader = loader(two_sources, bpe_tok, mbs=4)
    epoch_len = ref_loader.samples_per_epoch
    steps = epoch_len // 4 + 4  # run past an epoch boundary
    reference = [b["input_ids"] for b in take(ref_loader, steps)]
    assert ref_loader.epoch == 1

    # 2 DP ranks x 2 samples for a few steps, checkpoint, resume on 4 ranks x 1 sample
    first = 3
    ranks = [loader(two_sources, bpe_tok, mbs=2, dp_rank=r, dp_size=2) for r in range(2)]
    got = [torch.cat([next(r)["input_ids"] for r in ranks]) for _ in range(first)]
    states = [r.state_dict() for r in ranks]
    assert states[0] == states[1] and states[0]["consumed_samples"] == 4 * first
    resumed = [loader(two_sources, bpe_tok, mbs=1, dp_rank=r, dp_size=4) for r in range(4)]
    for r in resumed:
        r.load_state_dict(states[0])
    got += [torch.cat([next(r)["input_ids"] for r in resumed]) for _ in range(steps - first)]
    for step, (want, have) in enumerate(zip(reference, got)):
        assert torch.equal(want, have), f"global batch {step} differs after resume"
    assert resumed[0].state_dict()["epoch"] == 1


def test_blend_follows_weights(two_sources, bpe_tok):
    it = loader(two_sources, bpe_tok, mbs=8, weights=[1.0, 3.0])
    n = it.samples_per_epoch
    from_a = from_b = 0
    for _ in range(n // 8):
        for row in next(it)["input_ids"]:
            body = row[(row != 2) & (row < 700)]
            from_a += bool(((body >= 100) & (body < 400)).all())
            from_b += bool(((body >= 400) & (body < 700)).all())
    assert from_a + from_b == (n // 8) * 8  # every sample comes from exactly one source
    assert abs(from_b / (from_a + from_b) - 0.75) < 0.03


def test_splits_hold_disjoint_documents(two_sources, bpe_tok):
    def tags(split, steps):
        it = loader(two_sources, bpe_tok, split=split)
        ids = torch.cat([b["input_ids"] for b in take(it, steps)])
        return set(ids[ids >= 700].tolist())

    train, valid = tags("train", 20), tags("valid", 3)
    assert valid and train and not (train & valid)


def test_state_checks_data_and_tokenizer(two_sources, bpe_tok, tekken_tok):
    state = loader(two_sources, bpe_tok).state_dict()
    other_blend = loader(two_sources, bpe_tok, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        other_blend.load_state_dict(state)
    with pytest.warns(UserWarning, match="data changed"):
        other_blend.load_state_dict(state, strict=False)
    bad = dict(state, tokenizer=tekken_tok.fingerprint())
    with pytest.raises(ValueError, match="tokenizer"):
        loader(two_sources, bpe_tok).load_state_dict(bad)


def test_bad_config_errors(two_sources, bpe_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no Megatron indexed dataset"):
        loader([str(tmp_path / "nothing")], bpe_tok)
    with pytest.raises(ValueError, match="one weight per path"):
        DataConfig(paths=list(two_sources), weights=[1.0])
    with pytest.raises(ValueError, match="no documents in the test split"):
        loader(two_sources, bpe_tok, split="test")


def test_embedded_stdlib_default(bpe_tok, cache_dir):
    from latentforge.data.stdlib_corpus import stdlib_files, stdlib_prefix

    cfg = DataConfig(stdlib_max_mb=0.2)  # paths default to builtin:stdlib
    it = build_pretrain_loader(cfg, bpe_tok, seq_len=64, micro_batch_size=2)
    batch = next(it)
    assert batch["input_ids"].shape == (2, 64)
    prefix = stdlib_prefix(bpe_tok, 0.2)
    mtime = os.path.getmtime(prefix + ".bin")
    assert stdlib_prefix(bpe_tok, 0.2) == prefix and os.path.getmtime(prefix + ".bin") == mtime  # cached
    from latentforge.data.util import megatron_datasets

    ds = megatron_datasets()[0].IndexedDataset(prefix)
    first = stdlib_files(0.2)[0]
    assert bpe_tok.decode(ds[0][:-1].tolist()) == open(first, encoding="utf-8").read()


def _distributed_worker(rank, world_size, paths, tokenizer_path, cache):
    os.environ["LATENTFORGE_CACHE"] = cache
    tok = load_tokenizer(f"hf:{tokenizer_path}")
    it = loader(paths, tok, mbs=2, dp_rank=rank, dp_size=world_size)
    # plain lists: a tensor sent back through torch.multiprocessing needs this process alive until it is received
    return [next(it)["input_ids"].tolist() for _ in range(3)]


def test_distributed_build_matches_single_process(two_sources, bpe_tok, tmp_path):
    from tests.distributed import run_distributed

    # a fresh cache: rank 0 builds megatron's index files, rank 1 waits at megatron's barrier and reads them
    per_rank = run_distributed(_distributed_worker, 2, list(two_sources), bpe_tok.path, str(tmp_path / "c"))
    reference = take(loader(two_sources, bpe_tok, mbs=4), 3)
    for step in range(3):
        assert per_rank[0][step] + per_rank[1][step] == reference[step]["input_ids"].tolist()
