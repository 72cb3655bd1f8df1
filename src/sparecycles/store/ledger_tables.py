"""The ledger's tables: accounts, immutable transfers, the terms of each hold, prices, payouts.

The shape follows TigerBeetle: an account keeps four running totals (debits and credits, posted
and pending) that are updated in the same transaction as the transfer rows that explain them, so
an auditor can recompute every total from the transfers alone (``ledger/audit.py`` does). Rows of
``ledger_transfers`` and ``ledger_holds`` are only ever inserted: a mistake is fixed by a
correcting transfer, never by an update or a delete.

Money is ``BigInteger`` micro-units of the row's ``currency``; there is no float money column.
Database CHECK constraints repeat the guarantees that must never break even if the code does:
amounts and totals are never negative, a transfer never moves money from an account to itself,
and a client account never falls below its credit limit.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from sparecycles import limits
from sparecycles.store.db import Base

# BIGINT on PostgreSQL; on SQLite an INTEGER PRIMARY KEY is the 64-bit rowid (autoincrements).
_Seq = BigInteger().with_variant(Integer(), "sqlite")


class LedgerAccount(Base):
    """One account: a client's prepaid balance, an owner's earned/payable/paid, the platform's.

    ``id`` names the holder and the purpose (``client:<id>``, ``owner:<id>:earned``,
    ``platform:fees``; see ``ledger/engine.py``). A client account may fall to
    ``-credit_limit_micros`` and no lower; the CHECK constraint below enforces it in the database.
    """

    __tablename__ = "ledger_accounts"
    __table_args__ = (
        CheckConstraint(
            "debits_posted >= 0 AND credits_posted >= 0 "
            "AND debits_pending >= 0 AND credits_pending >= 0 AND credit_limit_micros >= 0",
            name="totals_not_negative",
        ),
        CheckConstraint(
            f"debits_posted <= {limits.ledger_total_micros_max} "
            f"AND credits_posted <= {limits.ledger_total_micros_max} "
            f"AND debits_pending <= {limits.ledger_total_micros_max} "
            f"AND credits_pending <= {limits.ledger_total_micros_max} "
            f"AND credit_limit_micros <= {limits.ledger_total_micros_max}",
            name="totals_bounded",
        ),
        CheckConstraint(
            "kind <> 'client' OR "
            "credits_posted - debits_posted - debits_pending + credit_limit_micros >= 0",
            name="client_within_limit",
        ),
    )
    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    kind: Mapped[str] = mapped_column(String(24))
    holder_id: Mapped[str | None] = mapped_column(String(80), nullable=True, index=True)
    currency: Mapped[str] = mapped_column(String(8))
    debits_posted: Mapped[int] = mapped_column(BigInteger, default=0)
    credits_posted: Mapped[int] = mapped_column(BigInteger, default=0)
    debits_pending: Mapped[int] = mapped_column(BigInteger, default=0)
    credits_pending: Mapped[int] = mapped_column(BigInteger, default=0)
    credit_limit_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at_s: Mapped[float] = mapped_column(Float)


class LedgerTransfer(Base):
    """One immutable movement of money; ``id`` is derived from the job and event (idempotency).

    ``kind='hold'`` rows are pending (they reserve, not move); a later ``post`` or ``void`` row
    names the hold in ``pending_id`` and resolves it. ``pending_id`` is unique, so a hold is
    resolved at most once. ``fingerprint`` is the SHA-256 of the request that made the transfer:
    a retry with the same id and fingerprint is answered from the stored rows, the same id with a
    different fingerprint is refused.
    """

    __tablename__ = "ledger_transfers"
    __table_args__ = (
        CheckConstraint("amount_micros >= 0", name="amount_not_negative"),
        CheckConstraint("debit_account_id <> credit_account_id", name="two_accounts"),
        # Every query by time also names a kind (costs, withholds, old holds of a period), so
        # one index serves both (one index fewer to update per transfer than kind and time).
        Index("ix_ledger_transfers_kind_created_at_s", "kind", "created_at_s"),
        # Unique among the posts and voids that name a hold; the three rows of four per
        # settlement without one are left out of the index (NULLs never collide anyway).
        Index("ix_ledger_transfers_pending_id", "pending_id", unique=True,
              postgresql_where=text("pending_id IS NOT NULL"),
              sqlite_where=text("pending_id IS NOT NULL")),
    )
    seq: Mapped[int] = mapped_column(_Seq, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(200), unique=True)
    # No foreign keys to ledger_accounts: on PostgreSQL their per-row checks were half the cost
    # of inserting a transfer (and made the hot platform accounts' rows multixacts). The same
    # transaction updates the totals of every account its transfers name, checks that each
    # one was updated, and holds their locks until commit (``LedgerTx._apply_totals``);
    # accounts are never deleted; ``ledger check`` reports a transfer naming a missing account.
    debit_account_id: Mapped[str] = mapped_column(String(120), index=True)
    credit_account_id: Mapped[str] = mapped_column(String(120), index=True)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(24))
    job_id: Mapped[str | None] = mapped_column(String(80), nullable=True, index=True)
    pending_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    memo: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at_s: Mapped[float] = mapped_column(Float)


class LedgerHold(Base):
    """The terms a job was admitted on: prices and owner share are fixed when the hold is made,
    so a price change never alters what an admitted job costs or earns. Insert-only."""

    __tablename__ = "ledger_holds"
    job_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(80))  # read by job id only: no index
    model: Mapped[str] = mapped_column(String(200))
    currency: Mapped[str] = mapped_column(String(8))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    input_micros_per_mtok: Mapped[int] = mapped_column(BigInteger)
    output_micros_per_mtok: Mapped[int] = mapped_column(BigInteger)
    terms: Mapped[dict] = mapped_column(JSON)  # payout terms: mode, owner share, busy rates
    hold_micros: Mapped[int] = mapped_column(BigInteger)
    created_at_s: Mapped[float] = mapped_column(Float)


class LedgerPrice(Base):
    """A model's price set through the admin API or CLI; overrides the configured PriceBook."""

    __tablename__ = "ledger_prices"
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    currency: Mapped[str] = mapped_column(String(8))
    input_micros_per_mtok: Mapped[int] = mapped_column(BigInteger)
    output_micros_per_mtok: Mapped[int] = mapped_column(BigInteger)
    updated_at_s: Mapped[float] = mapped_column(Float)


class PayoutBatch(Base):
    """One payout run. ``state``: ``open`` (transfers to payable posted, not claimed),
    ``writing`` (claimed by the run ``run_token`` at ``claimed_at_s``, which alone writes its
    file), ``paid`` (file written, payable moved to paid) or ``returned`` (every line of it
    failed and was reversed: nothing of it stands as paid). A batch id is used once."""

    __tablename__ = "payout_batches"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    currency: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16))
    min_micros: Mapped[int] = mapped_column(BigInteger)
    total_micros: Mapped[int] = mapped_column(BigInteger)
    owners: Mapped[int] = mapped_column(Integer)
    file_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    file_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at_s: Mapped[float] = mapped_column(Float)
    paid_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    run_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    claimed_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class PayoutItem(Base):
    """One owner's line in a batch. ``state``: ``open``, ``paid`` or ``failed`` (reversed)."""

    __tablename__ = "payout_items"
    __table_args__ = (
        PrimaryKeyConstraint("batch_id", "owner_id"),
        CheckConstraint("amount_micros > 0", name="amount_positive"),
    )
    batch_id: Mapped[str] = mapped_column(ForeignKey("payout_batches.id"))
    owner_id: Mapped[str] = mapped_column(String(80), index=True)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    failed_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    failed_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)


LEDGER_TABLES = (
    LedgerAccount.__table__,
    LedgerTransfer.__table__,
    LedgerHold.__table__,
    LedgerPrice.__table__,
    PayoutBatch.__table__,
    PayoutItem.__table__,
)
