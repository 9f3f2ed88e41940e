"""Priority order, FIFO within a level, and ageing of the in-memory queue."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klipstream.models import Priority
from klipstream.queue import JobQueue, QueueFull


def drain(queue: JobQueue) -> list[str]:
    out = []
    while (job := queue.pop_nowait()) is not None:
        out.append(job)
    return out


def test_priority_then_fifo():
    queue = JobQueue(maxsize=100, aging_seconds=3600)
    for name, priority in [
        ("l1", Priority.LOW),
        ("n1", Priority.NORMAL),
        ("u1", Priority.URGENT),
        ("h1", Priority.HIGH),
        ("n2", Priority.NORMAL),
        ("u2", Priority.URGENT),
    ]:
        queue.push(name, priority)
    assert queue.position("u1") == 1 and queue.position("l1") == 6
    assert drain(queue) == ["u1", "u2", "h1", "n1", "n2", "l1"]


def test_ageing_lets_an_old_low_job_overtake():
    queue = JobQueue(maxsize=100, aging_seconds=10)
    queue.push("old-low", Priority.LOW, waited=35)  # 3.5 levels of credit
    queue.push("new-urgent", Priority.URGENT)
    queue.push("new-high", Priority.HIGH)
    assert drain(queue) == ["old-low", "new-urgent", "new-high"]


def test_remove_and_bounds():
    queue = JobQueue(maxsize=2, aging_seconds=60)
    queue.push("a", Priority.NORMAL)
    queue.push("b", Priority.NORMAL)
    with pytest.raises(QueueFull):
        queue.push("c", Priority.NORMAL)
    assert queue.remove("a") and not queue.remove("a")
    assert len(queue) == 1 and queue.counts()["normal"] == 1
    assert drain(queue) == ["b"]


async def test_pause_holds_pop_until_resume():
    queue = JobQueue(maxsize=10, aging_seconds=60)
    queue.pause()
    queue.push("a", Priority.NORMAL)
    waiter = asyncio.create_task(queue.pop())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    queue.resume()
    assert await asyncio.wait_for(waiter, 1) == "a"


@settings(max_examples=60, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(st.sampled_from(list(Priority)), st.floats(min_value=0, max_value=100)), min_size=1, max_size=40
    ),
    removed=st.sets(st.integers(min_value=0, max_value=39)),
)
def test_position_is_the_place_in_the_pop_order(jobs, removed):
    """Whatever the mix of levels and ageing credits, a job's reported place is where it pops."""
    queue = JobQueue(maxsize=100, aging_seconds=10)
    for i, (priority, waited) in enumerate(jobs):
        queue.push(f"j{i}", priority, waited=waited)
    for i in removed:
        queue.remove(f"j{i}")
    positions = {f"j{i}": queue.position(f"j{i}") for i in range(len(jobs)) if f"j{i}" in queue}
    order = drain(queue)
    assert positions == {job: place for place, job in enumerate(order, 1)}


def test_place_for_a_new_job_counts_its_level():
    queue = JobQueue(maxsize=10, aging_seconds=3600)
    for i in range(3):
        queue.push(f"n{i}", Priority.NORMAL)
    queue.push("h", Priority.HIGH)
    assert queue.place_for_new(Priority.URGENT) == 1
    assert queue.place_for_new(Priority.HIGH) == 2
    assert queue.place_for_new(Priority.LOW) == 5
    queue.push("u", Priority.URGENT)
    assert queue.position("u") == 1


def test_places_follow_every_change_of_the_queue():
    queue = JobQueue(maxsize=10, aging_seconds=3600)
    queue.push("n1", Priority.NORMAL)
    queue.push("n2", Priority.NORMAL)
    assert queue.position("n2") == 2
    queue.push("u1", Priority.URGENT)
    assert queue.position("n2") == 3  # a later urgent job goes first
    queue.remove("n1")
    assert queue.position("n2") == 2
    assert queue.pop_nowait() == "u1"
    assert queue.position("n2") == 1 and queue.position("u1") is None


def test_oldest_age_and_counts_follow_removals():
    queue = JobQueue(maxsize=10, aging_seconds=60)
    assert queue.oldest_age() is None
    queue.push("old", Priority.LOW, waited=30)
    queue.push("new", Priority.URGENT)
    assert 29 < queue.oldest_age() < 31
    queue.remove("old")
    assert queue.oldest_age() < 1 and queue.counts() == {"low": 0, "normal": 0, "high": 0, "urgent": 1}
