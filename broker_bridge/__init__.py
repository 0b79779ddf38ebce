"""The bridge between the manager's database and the MQTT broker.

`relay` drains the outbox (changed documents) and the command queue to the broker; `ingest` brings
agent state from the broker into the agents table; `reconcile` keeps the broker's accounts in step
with the agents table; `lease` makes sure one bridge at a time relays; `service` runs them together.
`broker` is the one module that talks to the broker; `mosquitto` makes and runs a broker for a laptop
and for tests.
"""
