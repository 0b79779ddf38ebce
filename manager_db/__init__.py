"""The manager's schema: SQL tables, the database session, migrations and the shared counters.

Both the api and the bridge import it; it imports neither of them (DESIGN.md section 2).

`models` (the SQLModel tables), `database` (engines, sessions, migrations), `counters` (the change
lock, serials and the change generation), `sightings` (the one statement that records an agent as
seen, written by heartbeat bookkeeping and by the bridge's state ingest), `convergence` (which change
issued a serial, and when it committed), `metrics` (the Prometheus metrics both processes derive from
the schema: the outbox and the convergence SLO), `migrations/` (Alembic).
"""
