"""`policycast up`: the whole fabric on one machine, demo agents included.

The one package that puts the others together in one process (the manager, the bridge, a Mosquitto it
starts, and reference agents), so that `api` never imports `agent_stub` (DESIGN.md §2). The
`policycast` command is the manager's CLI (`api.cli`) with `up` added here.
"""
