"""Policycast's benchmarks: `make bench` (`python -m bench`).

Each benchmark is a module of this package that exposes

    NAME: str                      the name used by `--only` and in result file names
    run(args) -> dict              runs the benchmark and returns its result (JSON-able)

and is found by `python -m bench` without being listed anywhere. `args` is the `argparse.Namespace` of
`python -m bench`: `agents` (int, or None for the module's default), `full` (the issue's full sizes),
`fresh` (discard the kept benchmark state first), `work_dir` (a `Path` for kept state:
`bench/.work/`, gitignored), `plain` (plain HTTP and MQTT instead of TLS, which every benchmark
speaks by default, as production does) and `seed`. A benchmark measures its own baseline in the same run and
reports the ratio; `python -m bench` writes each result to `bench/results/<NAME>-<date>.json`.

What the benchmarks share, a module a concept (none of them exposes `NAME`):

    stack      the stack a benchmark runs against (Mosquitto, the manager and the bridge, as
               `policycast up` runs them) in a kept data directory; the operator's admin API calls,
               publishing straight to the broker, the waits for quiet
    fleet      the fleet simulator as a child process, driven over its control protocol
    observer   one more subscriber on every config topic, in a process of its own
    meters     CPU seconds of the processes under test, heartbeats counted at the manager, /healthz probe
    results    the result file (`write_result`, the one way results are written), machine, ratio
    checkout   this checkout's root and commit, the kept work directory, child processes' environment
    console    `say`: progress lines on stderr

and what a few of them need: benchmark 2's `servers` under test (and benchmark 3's manager),
`load_client` and `wrk_client`, `heartbeat_requests` and `baseline_app`; benchmark 3's `tcp_counters`
and `wire_push` (its MQTT half); benchmark 5's `group_tree` and `scale_stack`.
"""
