"""The Policycast contract shared by the manager, the bridge and the agents.

One module per concept: `settings` (configuration), `topics` (the MQTT topic scheme), `wire` (the JSON
models that cross a process boundary), `canonical` (canonical JSON), `signing` (Ed25519 envelopes),
`serials` (the anti-rollback rule) and `errors` (the exception hierarchy).
"""
