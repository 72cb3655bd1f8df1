"""ledger throughput: no per-row foreign keys on transfers, fewer indexes to update

The foreign keys from ``ledger_transfers`` to ``ledger_accounts`` cost half of every transfer's
insert on PostgreSQL (one locking lookup per row and side). Each transaction that inserts
transfers updates, locks and counts every account they name before it commits
(``LedgerTx._apply_totals``), and ``ledger check`` reports a transfer that names a missing
account. ``ledger_holds.client_id`` is never searched by. Every query of transfers by time also
names a kind, so one index on (kind, created_at_s) replaces the two on kind and on created_at_s.
The unique index on ``pending_id`` leaves out the rows without one (three of a settlement's four).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ledger_transfers') as batch_op:
        batch_op.drop_constraint(
            batch_op.f('fk_ledger_transfers_debit_account_id_ledger_accounts'), type_='foreignkey')
        batch_op.drop_constraint(
            batch_op.f('fk_ledger_transfers_credit_account_id_ledger_accounts'),
            type_='foreignkey')
        batch_op.create_index(batch_op.f('ix_ledger_transfers_kind_created_at_s'),
                              ['kind', 'created_at_s'], unique=False)
        batch_op.drop_index(batch_op.f('ix_ledger_transfers_kind'))
        batch_op.drop_index(batch_op.f('ix_ledger_transfers_created_at_s'))
        batch_op.drop_constraint(batch_op.f('uq_ledger_transfers_pending_id'), type_='unique')
        batch_op.create_index(batch_op.f('ix_ledger_transfers_pending_id'), ['pending_id'],
                              unique=True, postgresql_where=sa.text('pending_id IS NOT NULL'),
                              sqlite_where=sa.text('pending_id IS NOT NULL'))
    with op.batch_alter_table('ledger_holds') as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_holds_client_id'))


def downgrade() -> None:
    with op.batch_alter_table('ledger_holds') as batch_op:
        batch_op.create_index(batch_op.f('ix_ledger_holds_client_id'), ['client_id'], unique=False)
    with op.batch_alter_table('ledger_transfers') as batch_op:
        batch_op.create_index(batch_op.f('ix_ledger_transfers_created_at_s'), ['created_at_s'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_transfers_kind'), ['kind'], unique=False)
        batch_op.drop_index(batch_op.f('ix_ledger_transfers_kind_created_at_s'))
        batch_op.drop_index(batch_op.f('ix_ledger_transfers_pending_id'))
        batch_op.create_unique_constraint(batch_op.f('uq_ledger_transfers_pending_id'),
                                          ['pending_id'])
        batch_op.create_foreign_key(
            batch_op.f('fk_ledger_transfers_debit_account_id_ledger_accounts'),
            'ledger_accounts', ['debit_account_id'], ['id'])
        batch_op.create_foreign_key(
            batch_op.f('fk_ledger_transfers_credit_account_id_ledger_accounts'),
            'ledger_accounts', ['credit_account_id'], ['id'])
