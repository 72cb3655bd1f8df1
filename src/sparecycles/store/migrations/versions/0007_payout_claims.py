"""payout claims: a batch is claimed by one run (run_token, claimed_at_s) before its file is written

Four ``payouts run`` at once each resumed the same open batch and wrote it to four files;
submitting them would have paid every owner four times. A run now claims the batch with one
conditional UPDATE (state ``writing``, its token, the time) and alone writes its file.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('payout_batches') as batch_op:
        batch_op.add_column(sa.Column('run_token', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('claimed_at_s', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('payout_batches') as batch_op:
        batch_op.drop_column('claimed_at_s')
        batch_op.drop_column('run_token')
