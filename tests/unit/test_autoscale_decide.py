"""The autoscaler's decision (docs/reference.md#autoscaler-settings): :func:`decide` is
pure, so every rule is tested here on samples, without a worker.
"""

from __future__ import annotations

from scanqueue.worker.autoscale import Policy, Sample, ScaleState, decide

POLICY = Policy(min_processes=2, max_processes=6, threshold=0, grow_after_s=3, keepalive_s=10)


def sample(
    now: float,
    processes: int = 2,
    reserved: int = 2,
    active: int | None = None,
    backlog: int = 0,
    last_received: float | None = None,
) -> Sample:
    return Sample(
        now=now,
        processes=processes,
        reserved=reserved,
        active=reserved if active is None else active,
        backlog=backlog,
        last_received=last_received,
    )


def run(policy: Policy, samples: list[Sample], state: ScaleState | None = None) -> list[int]:
    state = state or ScaleState()
    deltas = []
    for s in samples:
        decision = decide(policy, state, s)
        state = decision.state
        deltas.append(decision.delta)
    return deltas


# -- decide() -------------------------------------------------------------------------


def test_grows_only_after_the_backlog_stayed_above_the_threshold_for_the_period() -> None:
    # 7 waiting, under 4 x the 2 processes (the surge, below): the period applies.
    deltas = run(POLICY, [sample(t, backlog=7) for t in (0, 1, 2, 2.9, 3.0)])
    assert deltas == [0, 0, 0, 0, 4]  # by the excess, capped at max (6 - 2)


def test_grows_by_the_excess_over_the_threshold() -> None:
    policy = Policy(min_processes=2, max_processes=10, threshold=2, grow_after_s=1)
    assert run(policy, [sample(0, backlog=5), sample(1, backlog=5)]) == [0, 3]


def test_a_dip_below_the_threshold_restarts_the_period() -> None:
    samples = [
        sample(0, backlog=3),
        sample(2, backlog=0),
        sample(3, backlog=3),
        sample(5, backlog=3),
    ]
    assert run(POLICY, samples) == [0, 0, 0, 0]
    assert run(POLICY, [*samples, sample(6, backlog=3)])[-1] == 3


def test_does_not_grow_while_a_process_is_free() -> None:
    # A backlog held by other workers is not this worker's to absorb while it idles.
    deltas = run(POLICY, [sample(t, reserved=1, backlog=10) for t in range(10)])
    assert deltas == [0] * 10


def test_waits_another_period_before_growing_again() -> None:
    policy = Policy(min_processes=1, max_processes=8, threshold=0, grow_after_s=2, keepalive_s=30)
    state = ScaleState()
    grown = []
    procs = 1
    for t in range(9):
        d = decide(policy, state, sample(t, processes=procs, reserved=procs, backlog=2))
        state = d.state
        procs += d.delta
        grown.append(procs)
    assert grown == [1, 1, 3, 3, 5, 5, 7, 7, 8]


def test_never_grows_past_max_and_restores_the_minimum_at_once() -> None:
    assert (
        run(POLICY, [sample(t, processes=6, reserved=6, backlog=50) for t in range(10)]) == [0] * 10
    )
    assert decide(POLICY, ScaleState(), sample(0, processes=1, reserved=0)).delta == 1


def test_shrinks_after_keepalive_of_surplus_to_what_was_needed_meanwhile() -> None:
    s0 = ScaleState(last_change=-100)
    samples = [
        sample(0, processes=6, reserved=3),
        sample(5, processes=6, reserved=4),  # the peak of the window
        sample(9.9, processes=6, reserved=1),
        sample(10, processes=6, reserved=1),
    ]
    assert run(POLICY, samples, s0) == [0, 0, 0, -2]


def test_shrinks_no_lower_than_the_minimum() -> None:
    s0 = ScaleState(last_change=-100)
    assert run(
        POLICY, [sample(0, processes=6, reserved=0), sample(10, processes=6, reserved=0)], s0
    ) == [0, -4]


def test_a_busy_moment_restarts_the_keepalive() -> None:
    s0 = ScaleState(last_change=-100)
    samples = [
        sample(0, processes=4, reserved=1),
        sample(6, processes=4, reserved=4),  # every process needed again
        sample(12, processes=4, reserved=0),
        sample(21, processes=4, reserved=0),
        sample(22, processes=4, reserved=0),
    ]
    assert run(POLICY, samples, s0) == [0, 0, 0, 0, -2]


def test_no_shrink_within_keepalive_of_the_last_change() -> None:
    state = ScaleState(last_change=5)
    assert run(
        POLICY, [sample(0, processes=6, reserved=0), sample(12, processes=6, reserved=0)], state
    ) == [0, 0]
    assert run(
        POLICY, [sample(0, processes=6, reserved=0), sample(15, processes=6, reserved=0)], state
    ) == [0, -4]


def test_no_shrink_while_a_reserved_scan_is_not_yet_accepted_by_a_process() -> None:
    # celery#7266: the process being handed the scan looks idle until it accepts it.
    s0 = ScaleState(last_change=-100)
    samples = [
        sample(0, processes=6, reserved=1, active=0),
        sample(10, processes=6, reserved=1, active=0),
    ]
    assert run(POLICY, samples, s0) == [0, 0]
    samples.append(sample(11, processes=6, reserved=1, active=1))
    assert run(POLICY, samples, s0)[-1] == -4


def test_no_shrink_right_after_a_scan_arrived() -> None:
    s0 = ScaleState(last_change=-100)
    samples = [
        sample(0, processes=6, reserved=0),
        sample(10, processes=6, reserved=0, last_received=9.5),
        sample(12, processes=6, reserved=0, last_received=9.5),
    ]
    assert run(POLICY, samples, s0) == [0, 0, -4]


# -- growing at once on a backlog many times the pool -------------------------------------


def test_a_backlog_many_times_the_processes_grows_at_once_by_what_it_needs() -> None:
    # 8 waiting >= 4 x 2 processes: no sustained period, straight to MAX.
    assert run(POLICY, [sample(0, backlog=8)]) == [4]
    wide = Policy(min_processes=2, max_processes=30, grow_after_s=3)
    decision = decide(wide, ScaleState(), sample(0, backlog=10))
    assert decision.delta == 10  # one process per waiting scan, not just up to 4x
    assert "4x or more the 2 processes" in decision.reason


def test_a_backlog_under_four_times_the_processes_still_waits_the_period() -> None:
    assert decide(POLICY, ScaleState(), sample(0, backlog=7)).delta == 0
    assert decide(POLICY, ScaleState(), sample(0, backlog=8)).delta == 4
    # A blip of 7 that does not last the period never grows the pool.
    blips = [sample(0, backlog=7), sample(2, backlog=0), sample(2.5, backlog=7)]
    assert run(POLICY, [*blips, sample(5, backlog=7)]) == [0, 0, 0, 0]


def test_the_surge_counts_the_excess_over_the_threshold() -> None:
    policy = Policy(min_processes=2, max_processes=20, threshold=2, grow_after_s=3)
    assert decide(policy, ScaleState(), sample(0, backlog=9)).delta == 0  # excess 7 < 8
    assert decide(policy, ScaleState(), sample(0, backlog=10)).delta == 8  # excess 8


def test_the_surge_still_needs_every_process_busy() -> None:
    # A backlog held by other workers is not this worker's while one of its processes idles.
    assert run(POLICY, [sample(t, reserved=1, backlog=100) for t in range(5)]) == [0] * 5


def test_no_surge_at_max_nor_with_the_factor_zero() -> None:
    assert run(POLICY, [sample(0, processes=6, reserved=6, backlog=1000)]) == [0]
    off = Policy(min_processes=2, max_processes=6, grow_after_s=3, surge_factor=0)
    assert run(off, [sample(t, backlog=1000) for t in (0, 1, 2, 3)]) == [0, 0, 0, 4]


def test_after_a_surge_the_bigger_pool_waits_unless_the_backlog_outgrows_it_too() -> None:
    policy = Policy(min_processes=2, max_processes=40, grow_after_s=3)
    first = decide(policy, ScaleState(), sample(0, backlog=10))
    assert first.delta == 10  # 2 -> 12
    state = first.state
    # 20 waiting < 4 x 12: the ordinary rule again, a whole period after the growth.
    deltas = []
    for t in (0.5, 1, 2, 3):
        d = decide(policy, state, sample(t, processes=12, reserved=12, backlog=20))
        state = d.state
        deltas.append(d.delta)
    assert deltas == [0, 0, 0, 20]
    # 48 waiting >= 4 x 12: at once again, capped at MAX.
    assert (
        decide(policy, first.state, sample(0.5, processes=12, reserved=12, backlog=48)).delta == 28
    )


def test_with_no_process_any_backlog_grows_at_once() -> None:
    policy = Policy(min_processes=0, max_processes=4, grow_after_s=3)
    assert decide(policy, ScaleState(), sample(0, processes=0, reserved=0, backlog=1)).delta == 1
    assert decide(policy, ScaleState(), sample(0, processes=0, reserved=0, backlog=0)).delta == 0
