"""The cost engine's one table: closed months, frozen.

``cost_closes`` holds what ``sparecycles costs close MONTH`` froze: the month's report and its
month view (JSON, as the CLI, the API and the dashboard show them), the FOCUS export (CSV) and
the cost model in effect that month (its text and the file it came from). A closed month is read
back from here, never recomputed, so a later edit of the cost model, a late ledger posting or a
changed price cannot rewrite it. Insert-only: a month is closed once.
"""

from __future__ import annotations

from sqlalchemy import Float, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from sparecycles.store.db import Base


class CostClose(Base):
    __tablename__ = "cost_closes"
    period: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    currency: Mapped[str] = mapped_column(String(8))
    closed_at_s: Mapped[float] = mapped_column(Float)
    report_json: Mapped[str] = mapped_column(Text)  # CostReport.as_dict(), month view included
    focus_csv: Mapped[str] = mapped_column(Text)
    cost_model_source: Mapped[str] = mapped_column(String(1000))
    cost_model_text: Mapped[str] = mapped_column(Text)  # the model in effect, as JSON
