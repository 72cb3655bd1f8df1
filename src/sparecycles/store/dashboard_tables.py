"""The dashboard's tables: samples of the fleet over time, and each API key's budget and rate.

``node_samples`` is written by ``DashboardQueries.record_node_sample`` (the coordinator calls it
every ``node_sample_interval_s``): one row per device class per sample, so "nodes online over
time" needs no log of every connection. ``key_limits`` holds what a client set for one of its
keys on the dashboard; the coordinator's ``KeyGate`` (``coordinator/admission.py``) enforces it
together with
the admin's ``key_policies``, the stricter of each.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from sparecycles.store.db import Base


class NodeSample(Base):
    """The fleet at one instant, per device class. ``queue_depth`` is network-wide (jobs waiting
    for a node), repeated on each row of the sample so that a sample is one query."""

    __tablename__ = "node_samples"
    __table_args__ = (Index("ix_node_samples_at_class", "at_s", "device_class"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at_s: Mapped[float] = mapped_column(Float)
    device_class: Mapped[str] = mapped_column(String(40))  # "" when no node is online
    online: Mapped[int] = mapped_column(Integer)  # nodes online or draining
    busy: Mapped[int] = mapped_column(Integer)  # of those, nodes running at least one job
    jobs_running: Mapped[int] = mapped_column(Integer)
    queue_depth: Mapped[int] = mapped_column(Integer)


class KeyLimit(Base):
    """A client's limits on one of its API keys: spend per calendar month (UTC) and requests
    per minute. ``None`` means no limit of that kind."""

    __tablename__ = "key_limits"
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    budget_micros_per_month: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at_s: Mapped[float] = mapped_column(Float)


DASHBOARD_TABLES = (NodeSample.__table__, KeyLimit.__table__)
