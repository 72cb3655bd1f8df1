"""cost closes: a closed month's report, FOCUS export and cost model, frozen

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('cost_closes',
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('currency', sa.String(length=8), nullable=False),
    sa.Column('closed_at_s', sa.Float(), nullable=False),
    sa.Column('report_json', sa.Text(), nullable=False),
    sa.Column('focus_csv', sa.Text(), nullable=False),
    sa.Column('cost_model_source', sa.String(length=1000), nullable=False),
    sa.Column('cost_model_text', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('period', name=op.f('pk_cost_closes'))
    )


def downgrade() -> None:
    op.drop_table('cost_closes')
