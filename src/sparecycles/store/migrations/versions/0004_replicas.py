"""replicas: each coordinator replica's lease, for claiming the jobs of a dead one

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('replicas',
    sa.Column('id', sa.String(length=80), nullable=False),
    sa.Column('started_at_s', sa.Float(), nullable=False),
    sa.Column('last_seen_at_s', sa.Float(), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_replicas'))
    )
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_replica_id'), ['replica_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_replica_id'))
    op.drop_table('replicas')
