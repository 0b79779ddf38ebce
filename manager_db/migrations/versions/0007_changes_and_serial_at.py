"""changes: each committed change's time and serial range; agents.serial_at; audit_log.generation

For the convergence SLO: seconds from a change's commit (changes.committed_at) to each agent reporting
the serial it issued (agents.serial_at).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('changes',
    sa.Column('generation', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('committed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('first_serial', sa.BigInteger(), nullable=True),
    sa.Column('last_serial', sa.BigInteger(), nullable=True),
    sa.Column('documents', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('generation')
    )
    with op.batch_alter_table('changes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_changes_last_serial'), ['last_serial'], unique=False)
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('serial_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('generation', sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f('ix_audit_log_generation'), ['generation'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_generation'))
        batch_op.drop_column('generation')
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_column('serial_at')
    with op.batch_alter_table('changes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_changes_last_serial'))
    op.drop_table('changes')
