"""stage attempts: the layers a chain's stage ran and its share of the work

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job_attempts') as batch:
        batch.add_column(sa.Column('layer_first', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('layer_end', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('work_ppm', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_attempts') as batch:
        batch.drop_column('work_ppm')
        batch.drop_column('layer_end')
        batch.drop_column('layer_first')
