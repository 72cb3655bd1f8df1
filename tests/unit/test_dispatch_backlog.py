"""A node's backlog (coordinator/node_conn.py): the totals kept as the books change equal the
books summed, whatever the order of sends, first tokens, forgets and jobs leaving the node."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sparecycles.coordinator.node_conn import Backlog

jobs = st.sampled_from(["a", "b", "c", "d"])
ops = st.lists(st.one_of(
    st.tuples(st.just("sent"), jobs, st.integers(0, 500), st.integers(0, 500)),
    st.tuples(st.just("streaming"), jobs),
    st.tuples(st.just("forget"), jobs),
    st.tuples(st.just("leave"), jobs),  # the job left the node's set without a forget
    st.tuples(st.just("read"), jobs),
), max_size=40)


@given(ops)
def test_the_kept_totals_are_the_books_summed(steps: list[tuple]) -> None:
    backlog, running = Backlog(), set()
    for step in steps:
        kind, job = step[0], step[1]
        if kind == "sent":
            backlog.sent(job, step[2], step[3])
            running.add(job)
        elif kind == "streaming":
            backlog.streaming(job)
        elif kind == "forget":
            backlog.forget(job)
            running.discard(job)
        elif kind == "leave":
            running.discard(job)
        want = (sum(v for j, v in backlog.prefill.items() if j in running),
                sum(v for j, v in backlog.kv.items() if j in running))
        assert backlog.totals(running) == want
        assert set(backlog.kv) <= running and set(backlog.prefill) <= set(backlog.kv)
