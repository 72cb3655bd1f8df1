"""ledger totals bounded: every account total at most limits.ledger_total_micros_max (2^62)

On SQLite an integer that passes 2^63 silently becomes a float, and ``ledger check`` then
crashed on it. The CHECK constraint refuses any total above 2^62 on both databases, so a
total plus one more transfer never reaches 64 bits.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 12:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_MAX = 2**62  # limits.ledger_total_micros_max when this was written; a migration is frozen


def upgrade() -> None:
    with op.batch_alter_table('ledger_accounts') as batch_op:
        batch_op.create_check_constraint(
            op.f('ck_ledger_accounts_totals_bounded'),
            f"debits_posted <= {_MAX} AND credits_posted <= {_MAX} "
            f"AND debits_pending <= {_MAX} AND credits_pending <= {_MAX} "
            f"AND credit_limit_micros <= {_MAX}")


def downgrade() -> None:
    with op.batch_alter_table('ledger_accounts') as batch_op:
        batch_op.drop_constraint(op.f('ck_ledger_accounts_totals_bounded'), type_='check')
