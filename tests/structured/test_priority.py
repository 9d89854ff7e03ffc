"""Priority: a waiting request of higher priority (lower value) preempts running lower ones when pages
run out (the engine's side: tests/structured/test_constrained_sampling.py)."""
from jpaged.engine.sequence import SequenceStatus
from tests.engine.test_scheduler import FakeModel, make_scheduler, seq


def _crowded(policy: str):
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64, scheduling_policy=policy)
    model = FakeModel(sched)
    low = [seq(i, 14, max_tokens=30, priority=5) for i in range(4)]  # 2 pages each: the pool is full
    for s in low:
        sched.add(s)
    model.step()
    assert all(s.status is SequenceStatus.RUNNING for s in low) and sched.num_free_pages == 0
    urgent = seq(9, 14, max_tokens=2, priority=0)
    sched.add(urgent)
    batch = model.step()
    return sched, model, low, urgent, batch


def test_a_waiting_higher_priority_request_preempts_the_lowest_running_one():
    sched, model, low, urgent, batch = _crowded("priority")
    assert urgent in [e.seq for e in batch.entries] and urgent.status is SequenceStatus.RUNNING
    assert batch.preempted and all(p.priority == 5 for p in batch.preempted)
    model.run()
    assert all(s.is_finished for s in low + [urgent]) and sched.num_free_pages == 8


def test_fcfs_never_preempts_for_a_waiting_request():
    sched, model, low, urgent, batch = _crowded("fcfs")
    assert urgent.status is SequenceStatus.WAITING
