"""The load harness's pure parts: the speed model, fake identities and tokens, the summary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparecycles.errors import InvariantViolation
from sparecycles.tools.loadtest.clients import Sample, summarize
from sparecycles.tools.loadtest.fakenodes import FakeModel, fake_identity, token_ids_for
from sparecycles.tools.loadtest.procs import spawn
from sparecycles.tools.loadtest.speed import SpeedModel


def test_speed_model_schedule_and_parse() -> None:
    s = SpeedModel.parse("prefill=1000,decode=100,overhead=0.01")
    assert s.ttft_s(500) == pytest.approx(0.51)
    assert s.token_due_s(500, 3) == pytest.approx(0.54)
    assert s.total_s(500, 4) == pytest.approx(0.54)
    assert SpeedModel.parse(s.describe()) == s
    assert SpeedModel.parse("") == SpeedModel()
    with pytest.raises(ValueError):
        SpeedModel.parse("fast=1")
    with pytest.raises(InvariantViolation):
        SpeedModel(decode_tokens_per_s=0)


def test_fake_nodes_are_the_same_on_every_run() -> None:
    assert fake_identity("s", 7).node_id == fake_identity("s", 7).node_id
    assert fake_identity("s", 7).node_id != fake_identity("s", 8).node_id
    model = FakeModel("m", "0" * 64, (10, 11, 12))
    ids = token_ids_for(model, "job_1", 1, 50)
    assert ids == token_ids_for(model, "job_1", 1, 50) and set(ids) <= {10, 11, 12}
    assert ids != token_ids_for(model, "job_1", 2, 50)


def test_summary_subtracts_the_fake_schedule() -> None:
    speed = SpeedModel(prefill_tokens_per_s=1000, decode_tokens_per_s=100, overhead_s=0.0)
    ok = [Sample(True, 200, 0.0, 0.1 + 0.02, 0.1 + 0.09 + 0.05, 100, 10, 10, f"j{i}")
          for i in range(10)]
    bad = [Sample(False, 503, 0.0, 0.0, 0.1, 0, 0, 0, "", error="no node")]
    out = summarize(ok + bad, 2.0, speed)
    assert out["ok"] == 10 and out["failed"] == 1 and out["requests_per_s"] == 5.0
    assert out["tokens_per_s"] == 50.0
    assert out["added_ttft_p50_ms"] == pytest.approx(20.0)
    assert out["added_total_p99_ms"] == pytest.approx(50.0)
    assert out["errors"] == {"503: no node": 1}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity (Linux) and two CPUs to choose one of")
def test_a_spawned_process_runs_on_the_cpus_and_interpreter_it_is_given(tmp_path: Path) -> None:
    """``spawn(cpus=..., python=...)`` (the coordinator benchmark's ``--pin`` and ``--python``):
    the child starts with that interpreter and may run only on those CPUs."""
    cpu = max(os.sched_getaffinity(0))
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "args: $*"\ngrep Cpus_allowed_list /proc/self/status\n')
    fake_python.chmod(0o755)
    log = tmp_path / "child.log"
    proc = spawn(["coordinator", "--port", "1"], log, cpus={cpu}, python=str(fake_python))
    assert proc.wait(timeout=30) == 0
    out = log.read_text()
    assert "args: -m sparecycles coordinator --port 1" in out
    assert out.split("Cpus_allowed_list:")[1].split()[0] == str(cpu)
