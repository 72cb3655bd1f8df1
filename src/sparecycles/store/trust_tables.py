"""The trust tables: each node's reputation, every verification, owners designated trusted, and
the limits an admin set on each API key.

``node_trust`` holds the Beta posterior of ``trust/reputation.py`` (alpha, beta and the counts that
drive the spot-check rate) and the quarantine; it is rewritten after each verdict. ``verifications``
is append-only: one row per verdict on one attempt of a job, with the evidence (first divergence,
log-probability differences, z-score) and what was withheld. ``key_policies`` is the admin's side
of a key's limits (rate, budget per period, concurrent streams, trusted nodes only); the client's
own side is ``key_limits`` in ``store/dashboard_tables.py``.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from sparecycles.store.db import Base


class NodeTrustRow(Base):
    __tablename__ = "node_trust"
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    alpha: Mapped[float] = mapped_column(Float)
    beta: Mapped[float] = mapped_column(Float)
    checks: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    consecutive_clean: Mapped[int] = mapped_column(Integer, default=0)
    quarantined_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    quarantine_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at_s: Mapped[float] = mapped_column(Float)


class TrustedOwner(Base):
    """An owner whose nodes the operator vouches for (its own machines): they verify others and
    are not spot-checked themselves."""

    __tablename__ = "trusted_owners"
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id"), primary_key=True)
    designated_at_s: Mapped[float] = mapped_column(Float)


class VerificationRow(Base):
    __tablename__ = "verifications"
    __table_args__ = (Index("ix_verifications_node_created", "node_id", "created_at_s"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(40))  # whose work was checked
    verifier_node_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    method: Mapped[str] = mapped_column(String(16))  # verify.Method
    outcome: Mapped[str] = mapped_column(String(16))  # verify.Outcome
    reason: Mapped[str] = mapped_column(Text, default="")
    tokens_checked: Mapped[int] = mapped_column(Integer, default=0)
    first_divergence: Mapped[int | None] = mapped_column(Integer, nullable=True)
    logprob_diff_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    logprob_diff_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    greedy_gap_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    z: Mapped[float | None] = mapped_column(Float, nullable=True)
    withheld_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    verifier_busy_s: Mapped[float] = mapped_column(Float, default=0.0)
    created_at_s: Mapped[float] = mapped_column(Float)


class KeyPolicyRow(Base):
    """An admin's limits on one API key; ``None`` means no limit of that kind."""

    __tablename__ = "key_policies"
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    burst: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_period: Mapped[str] = mapped_column(String(8), default="month")  # day | month
    streams_max: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trusted_only: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at_s: Mapped[float] = mapped_column(Float)


TRUST_TABLES = (NodeTrustRow.__table__, TrustedOwner.__table__, VerificationRow.__table__,
                KeyPolicyRow.__table__)
