"""The NATS engine: a nats-server 2.15 cluster (its MQTT 3.1.1) in operator mode.

`engine` (`NatsEngine`, the `BrokerEngine` implementation), `nkeys` (Ed25519 keys in NATS's
encoding), `jwt` (NATS v2 JWTs), `keys` (the operator, account and system keys, made once and
shared), `credentials` (the JWTs the engine mints and their permissions), `config` (each node's
nats-server.conf), `sysclient` (the system-account connection that pushes account updates),
`install` (where nats-server is).
"""
