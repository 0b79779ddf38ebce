"""Service functions: keyword-only, one resource per module, no HTTP in sight.

Reads take a `Session`; changes take a `Change` (`api.services.change`), which holds the change lock,
the actor for the audit trail and the signing key, and commits once at the end.
"""
