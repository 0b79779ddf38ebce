"""The fleet simulator: many agents in one process, running the real agent logic with state in memory.

`policycast-agent simulate --agents N` enrols N agents against a running manager (or reuses identities
kept from an earlier run) and runs each exactly as `policycast-agent run` would: an `AgentCore` (signature,
group and serial checks, apply) over a `MemoryStateStore`, and an `AgentRuntime` (heartbeats, the push
session while the document says push, location awareness). What is shared is what a process can share
without changing the logic:

- one event loop (uvloop when installed) drives every paho-mqtt client through `MqttLink`'s external-loop
  socket callbacks (epoll underneath), so no agent owns a thread;
- one `httpx.AsyncClient` connection pool carries every agent's heartbeats (its pool wait is unbounded:
  waiting for a pooled connection is an artefact of the simulation, not a manager failure);
- a `Pacer` (a token bucket with jitter) spaces the start of agents and every MQTT connect, so that a
  fleet that starts or comes back at once does not overflow the broker's small listen backlog.

Agents are spread round-robin over groups and, within a group, over locations: each agent reports a host
fact `site` (`site-1`, `site-2`, ...; none for the Default location) and the simulator, when it prepares
the groups with an admin key, gives location `site-k` a condition on that fact. The agents then find
their location themselves, through the same `LocationTracker` as a real agent.

For benchmarks every agent keeps a few timestamps (wall clock, `time.time()`): each applied serial (an
`AgentCore` listener), the last config message handled (a wrapper around the link's message handler) and
the moment its push session came up (observed through its state store). `--control` turns stdin/stdout
into a JSON-lines channel through which a benchmark asks for summaries and waits for the fleet to reach
a state (`wait_converged`, `wait_messages`, `wait_sessions`), with latency percentiles from a given time.

The modules, in the order a run uses them: `plan` (what to simulate, the identities file), `admin` and
`enrol` (groups, tokens and identities), `agents` (`SimAgent`, `BareAgent`, their link and pacer),
`stats` (counters, progress), `fleet` (`SimulatedFleet`), `waits` and `control` (what benchmarks ask
for), `run` (the command's event loop, from start to summary).
"""
