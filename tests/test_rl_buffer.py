"""The asynchronous RL buffer's rules (glm5_jax/rl/buffer.py), without Ray: work handed out group by group and
again after a worker dies, duplicates refused, whole fresh groups taken oldest first, stale and failed samples
dropped, a group with more than half its samples left filled up by repeating them and one with half or fewer
dropped, generation held `capacity` samples ahead, and the state a checkpoint keeps."""

from __future__ import annotations

import numpy as np

from glm5_jax.rl.buffer import SampleBuffer
from glm5_jax.rl.rollout import Sample

G = 4


class Prompts:
    """A PromptSet's interface: prompt draw i is record i % 3."""

    train = [{"prompt": "a"}, {"prompt": "b", "max_new_tokens": 5}, {"prompt": "c"}]
    train_ids = [np.array([1, 2], np.int32), np.array([3], np.int32), np.array([4, 5, 6], np.int32)]

    def draw(self, i):
        return i % 3


def buffer(tau=1, capacity=64, state=None):
    return SampleBuffer(Prompts(), G, tau, capacity, lambda item: min(8, item.get("max_new_tokens", 8)), state)


def done(work, version, failure=None):
    tokens = np.concatenate([work.prompt, [7, 8]]).astype(np.int32)
    n = len(tokens)
    return Sample(work.sample_id, work.group, work.prompt_index, tokens, len(work.prompt), np.arange(n) >= len(work.prompt),
                  np.zeros(n, np.float32), version, True, reward=None if failure else 1.0, failure=failure)


def test_work_is_handed_out_by_group_and_again_after_a_worker_dies():
    b = buffer()
    first = b.assign(0, 6)  # a group and half of the next
    assert [w.sample_id for w in first] == [0, 1, 2, 3, 4, 5]
    assert [w.group for w in first] == [0] * 4 + [1] * 2
    assert first[4].budget == 5 and list(first[4].prompt) == [3]  # record 1's own bound
    second = b.assign(1, 3)
    assert [w.sample_id for w in second] == [6, 7, 8]  # the rest of group 1 first
    assert b.register(0) == 6  # worker 0 restarted: its six samples are generated again
    again = b.assign(1, 8)
    assert [w.sample_id for w in again][:6] == [0, 1, 2, 3, 4, 5]
    assert b.stats()["regenerated"] == 6


def test_duplicates_are_refused_and_a_taken_group_never_returns():
    b = buffer()
    work = b.assign(0, 8)
    b.put(0, [done(w, 0) for w in work])
    b.put(1, [done(work[0], 0)])  # the same sample again (a worker that was thought dead delivered it)
    assert b.stats()["duplicates"] == 1
    samples, staleness = b.take(8, 0)
    assert [s.sample_id for s in samples] == list(range(8)) and staleness == [0] * 8
    b.put(0, [done(work[1], 0)])  # late copy of a trained sample
    assert b.stats()["duplicates"] == 2 and b.take(4, 0) is None


def test_take_waits_for_whole_groups_and_drops_stale_and_failed_samples():
    b = buffer(tau=1)
    work = b.assign(0, 12)
    b.put(0, [done(w, 0) for w in work[:4]])  # group 0 complete
    b.put(0, [done(w, v) for w, v in zip(work[4:7], [1, 0, 1])])  # group 1: three of four
    assert b.take(8, 1) is None  # two groups wanted, one complete
    assert b.stats()["buffered"] == 7  # nothing was consumed by the refused take
    b.put(0, [done(work[7], 1)])
    b.put(0, [done(w, 1, failure="timeout") if i == 0 else done(w, 1) for i, w in enumerate(work[8:12])])
    samples, staleness = b.take(8, 2)  # group 0: all stale (version 0 at 2 > tau 1): dropped
    assert [s.sample_id for s in samples] == [4, 6, 7, 4, 9, 10, 11, 9]  # filled up by repeating
    assert staleness == [1] * 8
    st = b.stats()
    assert (st["dropped_stale"], st["dropped_groups"], st["failed"], st["padded"], st["trained"]) == (5, 1, 1, 2, 8)


def test_half_or_fewer_valid_drops_the_group():
    b = buffer(tau=0)
    work = b.assign(0, 4)
    b.put(0, [done(w, v) for w, v in zip(work, [1, 1, 0, 0])])  # at version 1: two of four fresh
    assert b.take(4, 1) is None
    assert b.stats()["dropped_groups"] == 1 and b.stats()["dropped_stale"] == 2


def test_generation_is_held_capacity_samples_ahead():
    b = buffer(capacity=8)
    assert len(b.assign(0, 6)) == 6
    assert len(b.assign(1, 6)) == 2  # 8 ahead
    b.put(0, [done(w, 0) for w in b.outstanding[0].values()])
    assert b.assign(1, 6) == []  # finished but not trained still counts
    b.take(4, 0)
    assert len(b.assign(1, 6)) == 4


def test_state_keeps_finished_samples_and_generates_the_in_flight_again():
    b = buffer()
    work = b.assign(0, 8)
    b.put(0, [done(w, 0) for w in work[:5]])
    b.take(4, 0)
    state = b.state()
    assert state["in_flight"] == [5, 6, 7] and [s.sample_id for s in state["finished"]] == [4]
    c = buffer(state=state)
    assert [w.sample_id for w in c.assign(0, 4)] == [5, 6, 7, 8]
    c.put(0, [done(w, 0) for w in c.outstanding[0].values() if w.group == 1])
    samples, _ = c.take(4, 0)
    assert [s.sample_id for s in samples] == [4, 5, 6, 7]
    c.put(0, [done(work[0], 0)])  # group 0 was trained before the checkpoint
    assert c.stats()["duplicates"] == 1
