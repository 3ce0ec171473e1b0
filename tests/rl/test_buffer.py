"""The staleness buffer: no token older than K versions ever reaches a training step, under adversarial schedules."""

import random

import pytest

from latentforge.rl.buffer import Sample, StalenessBuffer


def make_sample(gid, idx, versions, reward=None, finish="stop"):
    n = len(versions)
    return Sample(
        group_id=gid,
        sample_index=idx,
        prompt_ids=[1, 2],
        completion_ids=list(range(n)),
        logprobs=[-1.0] * n,
        versions=list(versions),
        finish_reason=finish,
        reward=float(idx % 2) if reward is None else reward,
    )


def test_straddling_sequence_counts_its_oldest_token():
    buf = StalenessBuffer(group_size=2, max_staleness=1)
    # sample 0 started at version 3 and was finished after two weight updates (tokens of 3, 4, 5)
    buf.add(make_sample(7, 0, [3, 3, 4, 5]))
    assert buf.add(make_sample(7, 1, [5, 5])) == "ready"
    assert buf.num_ready(train_version=4) == 1
    assert buf.num_ready(train_version=5) == 0  # token of version 3 would be 2 versions stale
    assert buf.pop(4, train_version=5) == []
    assert buf.counters["groups_stale_dropped"] == 1


def test_synchronous_k0_serves_only_current_version():
    buf = StalenessBuffer(group_size=2, max_staleness=0)
    buf.add(make_sample(0, 0, [2, 2]))
    buf.add(make_sample(0, 1, [2, 2]))
    assert [g.group_id for g in buf.pop(1, train_version=2)] == [0]
    buf.add(make_sample(1, 0, [2]))
    buf.add(make_sample(1, 1, [3]))
    assert buf.pop(1, train_version=3) == []  # one token of version 2 at step 3


def test_zero_advantage_groups_are_filtered_and_counted():
    buf = StalenessBuffer(group_size=3, max_staleness=2)
    for i in range(3):
        result = buf.add(make_sample(0, i, [0], reward=1.0))
    assert result == "zero_advantage"
    assert len(buf) == 0 and buf.counters["groups_zero_advantage"] == 1
    keep = StalenessBuffer(group_size=3, max_staleness=2, filter_zero_advantage=False)
    for i in range(3):
        result = keep.add(make_sample(0, i, [0], reward=1.0))
    assert result == "ready"


def test_bad_input_is_named():
    buf = StalenessBuffer(group_size=2, max_staleness=1)
    buf.add(make_sample(0, 0, [0]))
    with pytest.raises(ValueError, match="duplicate"):
        buf.add(make_sample(0, 0, [0]))
    with pytest.raises(ValueError, match="no reward"):
        s = make_sample(1, 0, [0])
        s.reward = None
        buf.add(s)
    with pytest.raises(ValueError, match="stamp every generated token"):
        Sample(0, 0, [1], [5, 6], [-1.0, -1.0], [0])
    with pytest.raises(ValueError, match="synchronous"):
        StalenessBuffer(group_size=2, max_staleness=-1)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_adversarial_schedule_never_breaks_the_bound(k):
    """Random interleavings of groups, per-token versions that straddle updates (some deliberately too old),
    out-of-order arrivals, pops of random sizes: every served token has staleness <= k, no group is served twice,
    and every completed group is accounted for (served, filtered, dropped as stale, or still waiting)."""
    rng = random.Random(k)
    G = 3
    buf = StalenessBuffer(group_size=G, max_staleness=k)
    served, next_gid, open_groups = set(), 0, {}
    for version in range(40):
        for _ in range(rng.randint(0, 6)):
            if not open_groups or rng.random() < 0.4:
                open_groups[next_gid] = list(range(G))
                rng.shuffle(open_groups[next_gid])
                next_gid += 1
            gid = rng.choice(list(open_groups))
            burst = len(open_groups[gid]) if rng.random() < 0.5 else 1  # whole group at once, or one sample
            for _ in range(burst):
                idx = open_groups[gid].pop()
                # mostly within the bound, sometimes older than it allows; tokens straddle updates
                start = version - (rng.randint(0, k) if rng.random() < 0.8 else rng.randint(k + 1, k + 3))
                stamps = sorted(rng.randint(start, version) for _ in range(rng.randint(1, 6)))
                buf.add(make_sample(gid, idx, stamps, reward=rng.choice([0.0, 1.0])))
            if not open_groups[gid]:
                del open_groups[gid]
        for group in buf.pop(rng.randint(0, 4), train_version=version):
            assert group.group_id not in served
            served.add(group.group_id)
            assert max(group.staleness(version)) <= k, (group.group_id, group.staleness(version))
            assert min(group.staleness(version)) >= 0
            assert len(group.samples) == G
    c = buf.counters
    assert c["groups_completed"] == (
        c["groups_served"] + c["groups_zero_advantage"] + c["groups_stale_dropped"] + len(buf)
    )
    assert c["groups_served"] == len(served) > 0
    assert c["groups_stale_dropped"] > 0  # the schedule did produce too-old groups, and none was served


def test_state_dict_round_trip_keeps_ready_groups_only():
    buf = StalenessBuffer(group_size=2, max_staleness=2)
    buf.add(make_sample(0, 0, [1]))
    buf.add(make_sample(0, 1, [1]))
    buf.add(make_sample(1, 0, [1]))  # partial: not saved, reported as pending
    assert buf.pending_group_ids() == [1]
    fresh = StalenessBuffer(group_size=2, max_staleness=2)
    fresh.load_state_dict(buf.state_dict())
    assert [g.group_id for g in fresh.pop(5, train_version=2)] == [0]
    assert fresh.pending_group_ids() == []
    with pytest.raises(ValueError, match="group_size"):
        StalenessBuffer(group_size=4, max_staleness=2).load_state_dict(buf.state_dict())
