"""drop two indexes every job wrote and no query read

``ix_jobs_model``: no query filters jobs by model (reports group by it, alongside a time range
or a client, which have their own indexes). ``ix_job_attempts_job_id``: the unique index on
``(job_id, attempt)`` serves every lookup by job (and the foreign key) already. Each cost a
B-tree insert per job on the request path (the second at a random page: job ids are random).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 21:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_jobs_model', table_name='jobs')
    op.drop_index('ix_job_attempts_job_id', table_name='job_attempts')


def downgrade() -> None:
    op.create_index('ix_job_attempts_job_id', 'job_attempts', ['job_id'], unique=False)
    op.create_index('ix_jobs_model', 'jobs', ['model'], unique=False)
