"""The composition root: the `policycast` command, the manager's app with its broker engine, and the
whole fabric on one machine (`policycast up`).

`cli` (every `policycast` subcommand, registered explicitly), `composition` (the manager's app with
the broker engine), `stack` (`policycast up`), `manager` (the manager and the bridge on threads),
`local_broker` and `broker_process` (a broker run for a laptop and the tests), `demo` (demo groups,
policies and agents). It is the one package that imports all the others (DESIGN.md section 2).
"""
