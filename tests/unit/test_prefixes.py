"""The coordinator's model of which node's prefix cache holds which prompt prefix
(coordinator/prefixes.py); test_dispatch.py places a conversation's next turn with it."""

from __future__ import annotations

from sparecycles.coordinator.prefixes import PrefixIndex, block_keys, block_tokens

B = block_tokens


def test_a_prompt_that_extends_a_served_job_hits_on_that_node_in_whole_blocks() -> None:
    index = PrefixIndex()
    served = list(range(10 * B + 3))  # prompt and answer of a finished job: 10 whole blocks
    index.record("n1", served, slots=4)
    index.record("n2", [7] * (5 * B), slots=4)
    follow = [*served, 900, 901, 902]
    assert index.hits(block_keys(follow)) == {"n1": 10 * B}
    other = [*served[: 4 * B], 5, 5, 5, *served[4 * B :]]  # differs inside block 5
    assert index.hits(block_keys(other)) == {"n1": 4 * B}
    assert index.hits(block_keys(follow), least_tokens=11 * B) == {}
    assert index.hits(block_keys(follow), most_tokens=3 * B + 5) == {"n1": 3 * B}


def test_a_node_keeps_only_its_last_slots_jobs_and_forgets_all_when_it_leaves() -> None:
    index = PrefixIndex()
    jobs = [[k] * (2 * B) for k in range(3)]
    for tokens in jobs:
        index.record("n1", tokens, slots=2)
    assert index.hits(block_keys(jobs[0])) == {}  # overwritten on the node by now
    assert index.hits(block_keys(jobs[2])) == {"n1": 2 * B}
    index.record("n2", jobs[2], slots=2)
    index.forget("n1")
    assert index.hits(block_keys(jobs[2])) == {"n2": 2 * B}
    index.forget("n2")
    assert len(index) == 0  # nothing left behind
