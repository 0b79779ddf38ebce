"""The heartbeat hot path: answered from memory, bookkept in batches, with two doors to one answer.

- `view`: `FabricView`, the documents and agents the heartbeat needs, in memory.
- `ledger`: `HeartbeatLedger`, what heartbeats report, written in one batch every `heartbeat_flush_s`.
- `checks`: what a heartbeat body must be to be answered, derived from the request model
  (`fabric_core.wire.HeartbeatRequest`) for the fast path, and what the database must be able to hold.
- `answer`: the one function that writes the heartbeat answer, for both doors.
- `fast_path`: `HeartbeatFastPath`, the ASGI layer that answers the everyday heartbeat before FastAPI.

The other door is the FastAPI route (`api.routes.heartbeat`), which answers everything else and
documents the body in the OpenAPI schema.
"""
