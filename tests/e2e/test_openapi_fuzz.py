"""Fuzz the coordinator's OpenAPI spec with schemathesis against a live coordinator.

Every operation of ``/openapi.json`` gets a bounded number of generated requests (valid and
invalid), sent with a key holding the inference and admin scopes. No request may be answered
500, and every documented response must match its schema (errors: OpenAI's shape). No node is
connected, so requests that reach dispatch end in a 503 after a short placement wait.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import LocalNetwork

pytestmark = pytest.mark.timeout(300)
examples_per_operation = 25  # ~25 operations: well under a minute on two cores
# Findings left to their owners: the operation and the check it is spared until fixed.
KNOWN = {"GET /v1/admin/costs/focus.csv": content_type_conformance}  # CSV documented as JSON


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("fuzz")
    network = LocalNetwork(root=root, models={"tiny": tiny_model_path},
                           coordinator_args=["--placement-wait-s", "0.2"])
    with network:
        store = network.store()
        _id, key = store.create_api_key("fuzz", "fuzz", ("inference", "admin"))
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("fuzz"), 10_000_000, reference="fuzz-topup")
        network.start_coordinator()
        yield network, key


def _fuzz(operation, url: str, key: str) -> None:
    """Run ``examples_per_operation`` generated requests against one operation."""
    spared = KNOWN.get(f"{operation.method.upper()} {operation.path}")
    checks = [c for c in (not_a_server_error, response_schema_conformance,
                          content_type_conformance) if c is not spared]

    @settings(max_examples=examples_per_operation, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case) -> None:
        case.call_and_validate(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
            checks=checks)

    run()


def test_no_500_and_no_schema_violation(live) -> None:
    # schemathesis' own pytest plugin does not run under pytest 9 yet, so the operations are
    # driven here, each through hypothesis with the strategy schemathesis builds for it
    network, key = live
    api = schemathesis.openapi.from_url(network.url + "/openapi.json")
    failures = {}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10
    for op in operations:
        try:
            _fuzz(op, network.url, key)
        except (Exception, BaseExceptionGroup) as exc:  # collect every finding, report all
            failures[f"{op.method.upper()} {op.path}"] = str(exc)[:2000]
    assert failures == {}, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
