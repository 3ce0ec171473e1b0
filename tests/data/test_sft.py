"""Packed SFT batches: best-fit packing, assistant-only labels, boundaries, truncation, resume."""

import json
import random
import re

import numpy as np
import pytest
import torch

from latentforge.data.chat import normalize_record, render_chat
from latentforge.data.config import DataConfig
from latentforge.data.packing import best_fit_decreasing
from latentforge.data.preprocess import MalformedInputError
from latentforge.data.sft import build_sft_loader

SEQ = 64


def naive_best_fit(lengths, capacity):
    """Reference: scan every open bin for the tightest fit."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: room[b])
        else:
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def test_best_fit_decreasing_matches_naive_reference():
    rng = random.Random(0)
    for _ in range(30):
        capacity = rng.randint(8, 100)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 200))]
        bins = best_fit_decreasing(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        ref = naive_best_fit(lengths, capacity)
        # equal-room bins are interchangeable, so the fills (not the bin ids) must agree
        assert sorted(sum(lengths[i] for i in b) for b in bins) == sorted(sum(lengths[i] for i in b) for b in ref)
    with pytest.raises(ValueError, match="outside"):
        best_fit_decreasing([5, 11], 10)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rng = random.Random(1)
    lines = []
    for k in range(60):
        n_turns = rng.randint(1, 2)
        if k % 3 == 0:
            lines.append({"prompt": f"question {k} " + "w " * rng.randint(0, 20), "completion": f"answer {k}"})
            continue
        msgs = [{"role": "system", "content": f"system {k}"}] if k % 5 == 0 else []
        for t in range(n_turns):
            msgs.append({"role": "user", "content": f"user {k}.{t} " + "x " * rng.randint(0, 15)})
            msgs.append({"role": "assistant", "content": f"reply {k}.{t}", "reasoning_content": f"think {k}"})
        lines.append({"messages": msgs})
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return str(path), lines


def sft(path, tok, mbs=4, dp_rank=0, dp_size=1, **kw):
    kw.setdefault("split", "100,0,0")
    return build_sft_loader(
        DataConfig(kind="sft", paths=[path], **kw),
        tok,
        seq_len=SEQ,
        micro_batch_size=mbs,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


@pytest.mark.parametrize("thinking", [True, False])
def test_packed_rows_against_rendered_conversations(chat_file, bpe_tok, cache_dir, thinking):
    path, records = chat_file
    rendered = [render_chat(bpe_tok, normalize_record(r), enable_thinking=thinking) for r in records]
    by_ids = {tuple(c.ids): c for c in rendered}
    it = sft(path, bpe_tok, enable_thinking=thinking)
    epoch = it.samples_per_epoch
    assert epoch < len(records)  # several conversations share a row
    seen = []
    rows = []
    while it.consumed_samples < epoch:
        b = next(it)
        rows += list(
            zip(b["input_ids"].tolist(), b["labels"].tolist(), b["seq_idx"].tolist(), b["attention_mask"].tolist())
        )
    for x, y, s, real in rows[:epoch]:
        for doc in sorted(set(s)):
            pos = [t for t in range(SEQ) if s[t] == doc]
            assert pos == list(range(pos[0], pos[-1] + 1))  # documents are contiguous, numbered in order
            seg = tuple(x[pos[0] : pos[-1] + 1])
            if set(seg) == {bpe_tok.eod_id}:  # padding
                assert all(y[t] == -100 for t in pos)
                assert not any(real[t] for t in pos)  # left out of the MoE balance loss
                continue
            assert all(real[t] for t in pos)
            # a conversation, or the head of one (truncated, or its last token beyond the row's inputs)
            match = [c for ids, c in by_ids.items() if ids[: len(seg)] == seg]
            exact = [c for c in match if len(c.ids) == len(seg)]
            assert exact or len(match) == 1, seg
            match = exact or match
            conv = match[0]
            seen.append(tuple(conv.ids))
            for k, t in enumerate(pos):
                nxt = k + 1
                if nxt < len(conv.ids) and conv.assistant_mask[nxt]:
                    assert y[t] == conv.ids[nxt]
                else:
                    assert y[t] == -100
    assert sorted(seen) == sorted(by_ids)  # every conversation once per epoch
    if not thinking:
        assert not any(re.search(r"think \d", bpe_tok.decode(x)) for x, _, _, _ in rows)  # no reasoning text


def test_truncation_policies_are_counted(chat_file, bpe_tok, cache_dir):
    path, records = chat_file
    lengths = [len(render_chat(bpe_tok, normalize_record(r)).ids) for r in records]
    too_long = sum(n > SEQ + 1 for n in lengths)
    assert too_long > 0
    trunc = sft(path, bpe_tok, truncation="truncate")
    assert trunc.source.stats["truncated"] == too_long and trunc.source.stats["dropped"] == 0
    assert trunc.source.stats["tokens_cut"] == sum(n - SEQ - 1 for n in lengths if n > SEQ + 1)
    drop = sft(path, bpe_tok, truncation="drop")
    assert drop.source.stats["dropped"] == too_long and drop.source.kept.size == len(records) - too_long
    with pytest.raises(ValueError, match=r"chat\.jsonl:\d+: conversation of \d+ tokens"):
        sft(path, bpe_tok, truncation="error")


def test_unpacked_rows_hold_one_conversation(chat_file, bpe_tok, cache_dir):
    path, records = chat_file
    it = sft(path, bpe_tok, packing=False, truncation="drop")
    assert it.samples_per_epoch == it.source.kept.size
    for _ in range(3):
        b = next(it)
        assert (b["seq_idx"].max(dim=1).values <= 1).all()  # the conversation, then padding


def test_resume_across_dp_change(chat_file, bpe_tok, cache_dir):
    path, _ = chat_file
    ref = sft(path, bpe_tok, mbs=4)
    steps = ref.samples_per_epoch // 4 + 3
    want = [next(ref)["input_ids"] for _ in range(steps)]
    a = [sft(path, bpe_tok, mbs=1, dp_rank=r, dp_size=4) for r in range(4)]
    got = [torch.cat([next(r)["input_ids"] for r in a]) for _ in range(2)]
    b = [sft(path, bpe_tok, mbs=2, dp_rank=r, dp_size=2) for r in range(2)]
    for r in b:
        r.load_state_dict(a[0].state_dict())
    got += [torch.cat([next(r)["input_ids"] for r in b]) for _ in range(steps - 2)]
    assert all(torch.equal(w, g) for w, g in zip(want, got))


@pytest.mark.parametrize("default", [True, False])
def test_enable_thinking_per_record_overrides_the_dataset(tmp_path, bpe_tok, cache_dir, default):
    """A record's "enable_thinking" renders that conversation as the chat template would with that switch (the
    reasoning and its </think> trained, or an empty <think></think> and no reasoning); absent: data.enable_thinking."""
    conv = {
        "messages": [
            {"role": "user", "content": "two plus two"},
            {"role": "assistant", "content": "four", "reasoning_content": "two and two make four"},
        ]
    }
    records = [
        dict(conv, enable_thinking=True),
        dict(conv, enable_thinking=False),
        dict(conv),
        {"prompt": "two plus two", "completion": "<think>add them</think>4", "enable_thinking": False},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    it = sft(str(path), bpe_tok, packing=False, enable_thinking=default)
    assert it.samples_per_epoch == len(records)
    b = next(it)  # one epoch: a conversation per row
    rows = {}
    for x, y, s in zip(b["input_ids"].tolist(), b["labels"].tolist(), b["seq_idx"].tolist()):
        n = s.count(0)  # the conversation, then padding
        rows[tuple(x[:n])] = [t for t in y[:n] if t != -100]
    expected = [
        render_chat(bpe_tok, normalize_record(r), enable_thinking=think)
        for r, think in zip(records, [True, False, default, False])
    ]
    assert len(rows) == 3  # the record without the key renders as the dataset default says
    for chat in expected:
        ids = tuple(chat.ids)  # shorter than the row: all of it among the inputs, padding after
        assert ids in rows
        assert rows[ids] == [t for t, m in zip(chat.ids[1:], chat.assistant_mask[1:]) if m]
        text = bpe_tok.decode(chat.ids)
        thinking = chat is expected[0] or (chat is expected[2] and default)
        assert ("two and two make four" in text) == thinking
        assert ("<think></think>" in text) == (not thinking)
    # off: the reasoning is neither in the inputs nor in the loss; on: it is trained, <think> itself is prompt
    on, off = expected[0], expected[1]
    assert bpe_tok.think_id in on.ids and not on.assistant_mask[on.ids.index(bpe_tok.think_id)]
    assert on.assistant_mask[on.ids.index(bpe_tok.think_end_id)]
    assert not off.assistant_mask[off.ids.index(bpe_tok.think_end_id)]  # </think> is part of the thinking-off prompt
    assert "add them" not in bpe_tok.decode(expected[3].ids)


def test_malformed_jsonl(tmp_path, bpe_tok, cache_dir):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "a", "completion": "b"}
    path.write_text(
        "\n".join(
            [json.dumps(good), "{oops", json.dumps({"messages": [{"role": "user", "content": "x"}]}), json.dumps(good)]
        )
        + "\n"
    )
    with pytest.raises(MalformedInputError, match=r"bad\.jsonl:2: invalid JSON"):
        sft(str(path), bpe_tok)
    it = sft(str(path), bpe_tok, skip_bad=True)
    assert it.source.stats["conversations"] == 2


def test_builtin_synthetic_chat(bpe_tok, cache_dir):
    cfg = DataConfig(kind="sft", paths=["builtin:arithmetic_chat"], synthetic_num_train=200, synthetic_num_heldout=20)
    it = build_sft_loader(cfg, bpe_tok, seq_len=128, micro_batch_size=2)
    batch = next(it)
    assert (batch["labels"] != -100).any()
    valid = build_sft_loader(cfg, bpe_tok, seq_len=128, micro_batch_size=2, split="valid")
    assert valid.source.stats["conversations"] == 20
    assert np.isclose(it.source.stats["fill"], it.source.kept_lengths.sum() / (it.samples_per_epoch * 129))


def test_non_utf8_line_is_one_malformed_line(tmp_path, bpe_tok, cache_dir, caplog):
    import logging

    path = tmp_path / "latin.jsonl"
    good = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() for i in range(5)]
    bad = json.dumps({"prompt": "caf\u00e9", "completion": "x"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join(good[:2] + [bad] + good[2:]) + b"\n")
    with pytest.raises(MalformedInputError, match=r"latin\.jsonl:3: not valid UTF-8"):
        sft(str(path), bpe_tok)
    with caplog.at_level(logging.WARNING, logger="latentforge.data.sft"):
        it = sft(str(path), bpe_tok, skip_bad=True)
    assert it.source.stats["conversations"] == 5 and it.source.stats["skipped_malformed"] == 1
    assert it.source.conv.skipped_examples[0].startswith(f"{path}:3: not valid UTF-8")
    assert any(f"1 malformed records skipped ({path}:3)" in r.getMessage() for r in caplog.records)
    assert sft(str(path), bpe_tok, skip_bad=True).source.stats["skipped_malformed"] == 1  # from the cache too


def test_missing_data_file_is_one_clear_error(tmp_path, bpe_tok, cache_dir):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=r"SFT data file .*nowhere\.jsonl does not exist \(data\.paths"):
        sft(str(missing), bpe_tok)
