"""Every query of verification, reputation and key policies in one place (tables in
``store/trust_tables.py``). Synchronous, one short transaction per method, like
``core_queries.Store``."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import sessionmaker

from sparecycles.errors import NotFound
from sparecycles.store.core_tables import ApiKey, JobRow, Node, Owner
from sparecycles.store.dashboard_tables import KeyLimit
from sparecycles.store.ledger_tables import LedgerTransfer
from sparecycles.store.trust_tables import (
    KeyPolicyRow,
    NodeTrustRow,
    TrustedOwner,
    VerificationRow,
)
from sparecycles.trust.reputation import NodeTrust
from sparecycles.types import KeyPolicy

verifications_listed_max = 200


class TrustQueries:
    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions

    # ---- reputation ------------------------------------------------------------------------

    def load_trust(self, node_id: str) -> NodeTrust | None:
        with self.sessions() as s:
            row = s.get(NodeTrustRow, node_id)
            if row is None:
                return None
            return NodeTrust(node_id, row.alpha, row.beta, row.checks, row.failures,
                             row.consecutive_clean, row.quarantined_at_s is not None,
                             row.quarantine_reason or "")

    def save_trust(self, trust: NodeTrust) -> None:
        now = time.time()
        with self.sessions.begin() as s:
            row = s.get(NodeTrustRow, trust.node_id)
            if row is None:
                row = NodeTrustRow(node_id=trust.node_id)
                s.add(row)
            row.alpha, row.beta = trust.alpha, trust.beta
            row.checks, row.failures = trust.checks, trust.failures
            row.consecutive_clean = trust.consecutive_clean
            if trust.quarantined and row.quarantined_at_s is None:
                row.quarantined_at_s, row.quarantine_reason = now, trust.quarantine_reason
            elif not trust.quarantined:
                row.quarantined_at_s, row.quarantine_reason = None, None
            row.updated_at_s = now

    def trusted_owner_ids(self) -> set[str]:
        with self.sessions() as s:
            return set(s.scalars(select(TrustedOwner.owner_id)))

    def set_owner_trusted(self, owner_name: str, trusted: bool) -> str:
        """Designate (or stop designating) an owner's nodes as trusted; returns the owner id."""
        with self.sessions.begin() as s:
            owner_id = s.scalar(select(Owner.id).where(Owner.name == owner_name))
            if owner_id is None:
                raise NotFound(f"no owner {owner_name!r}")
            s.execute(delete(TrustedOwner).where(TrustedOwner.owner_id == owner_id))
            if trusted:
                s.add(TrustedOwner(owner_id=owner_id, designated_at_s=time.time()))
            return owner_id

    def nodes_trust(self, owner_id: str | None = None) -> list[dict[str, Any]]:
        """Nodes (an owner's, or all) with their trust row, for the owner's and admin's views."""
        q = (select(Node.id, Node.name, Node.owner_id, Node.status, NodeTrustRow)
             .outerjoin(NodeTrustRow, NodeTrustRow.node_id == Node.id)
             .order_by(Node.first_seen_at_s).limit(verifications_listed_max))
        if owner_id is not None:
            q = q.where(Node.owner_id == owner_id)
        with self.sessions() as s:
            out = []
            for node_id, name, owner, status, row in s.execute(q).all():
                trust = None if row is None else NodeTrust(
                    node_id, row.alpha, row.beta, row.checks, row.failures,
                    row.consecutive_clean, row.quarantined_at_s is not None,
                    row.quarantine_reason or "")
                out.append({"node_id": node_id, "name": name, "owner_id": owner,
                            "status": status, "trust": trust})
            return out

    # ---- verifications ---------------------------------------------------------------------

    def record_verification(self, **fields: Any) -> None:
        fields.setdefault("created_at_s", time.time())
        with self.sessions.begin() as s:
            s.add(VerificationRow(**fields))

    def verifications(self, *, node_id: str | None = None, job_id: str | None = None,
                      owner_id: str | None = None, limit: int = verifications_listed_max
                      ) -> list[dict[str, Any]]:
        q = select(VerificationRow).order_by(VerificationRow.id.desc())
        if node_id is not None:
            q = q.where(VerificationRow.node_id == node_id)
        if job_id is not None:
            q = q.where(VerificationRow.job_id == job_id)
        if owner_id is not None:
            q = q.join(Node, Node.id == VerificationRow.node_id).where(Node.owner_id == owner_id)
        with self.sessions() as s:
            rows = s.scalars(q.limit(min(limit, verifications_listed_max)))
            return [{c.name: getattr(r, c.name) for c in VerificationRow.__table__.columns}
                    for r in rows]

    def verification_totals(self) -> dict[str, Any]:
        """Counts by method and outcome, and the verifier compute spent (for the benchmark)."""
        with self.sessions() as s:
            rows = s.execute(select(VerificationRow.method, VerificationRow.outcome, func.count(),
                                    func.sum(VerificationRow.verifier_busy_s),
                                    func.sum(VerificationRow.withheld_micros))
                             .group_by(VerificationRow.method, VerificationRow.outcome)).all()
        return {f"{m}:{o}": {"count": n, "busy_s": float(b or 0), "withheld_micros": int(w or 0)}
                for m, o, n, b, w in rows}

    # ---- key policies ----------------------------------------------------------------------

    def key_policy(self, key_id: str) -> tuple[KeyPolicy, int | None, int | None]:
        """(the admin's policy, the client's requests per minute, the client's monthly budget)."""
        with self.sessions() as s:
            row = s.get(KeyPolicyRow, key_id)
            mine = s.get(KeyLimit, key_id)
        admin = KeyPolicy() if row is None else KeyPolicy(
            requests_per_minute=row.requests_per_minute, burst=row.burst,
            budget_micros=row.budget_micros, budget_period=row.budget_period,
            streams_max=row.streams_max, trusted_only=row.trusted_only)
        if mine is None:
            return admin, None, None
        return admin, mine.requests_per_minute, mine.budget_micros_per_month

    def set_key_policy(self, key_id: str, policy: KeyPolicy) -> None:
        with self.sessions.begin() as s:
            if s.get(ApiKey, key_id) is None:
                raise NotFound(f"no key {key_id}")
            row = s.get(KeyPolicyRow, key_id)
            if row is None:
                row = KeyPolicyRow(key_id=key_id)
                s.add(row)
            fields = asdict(policy)
            fields.pop("monthly_budget_micros")
            for name, value in fields.items():
                setattr(row, name, value)
            row.updated_at_s = time.time()

    def key_spent_since(self, key_id: str, since_s: float) -> int:
        """What the key's jobs admitted since ``since_s`` were charged (posted), in micros."""
        with self.sessions() as s:
            total = s.scalar(
                select(func.sum(LedgerTransfer.amount_micros))
                .select_from(JobRow)
                .join(LedgerTransfer, and_(LedgerTransfer.job_id == JobRow.id,
                                           LedgerTransfer.kind == "post"))
                .where(JobRow.api_key_id == key_id, JobRow.created_at_s >= since_s))
        return int(total or 0)
