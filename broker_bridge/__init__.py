"""The bridge between the manager's database and the MQTT broker.

`relay` drains the outbox (changed documents) and the command queue to the broker; `ingest` brings
agent state from the broker into the agents table; `reconcile` keeps agents' broker access in step
with the agents table; `lease` makes sure one bridge at a time relays; `service` runs them together;
`cli` is `policycast bridge` and `policycast broker-config`. `broker` is the one MQTT connection to
the broker. `engine` is the seam behind which everything broker-specific sits (configuration, agent
access, delivery options); `mosquitto/` is its first engine. Errors: `errors`.
"""
