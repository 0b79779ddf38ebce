"""What many tests use; each module says more.

- `waiting`: `wait_for` / `wait_for_async`, the one way to wait for a condition (never a fixed sleep).
- `clients`: `Admin` and `AgentClient`, the admin and agent APIs over any httpx client (the in-process
  TestClient or a manager process's URL).
- `processes`: real processes (`Process`, `Manager`, `enrolled_agent` / `AgentProcess`, `free_port`).
- `broker`: a real Mosquitto with the project's own configuration (`Broker`, the `mosquitto` fixture),
  MQTT test clients, and `received_before_marker` for negative checks without a window.
- `stack`: the in-process manager with a real Mosquitto and a bridge thread (the `stack` fixture).
- `world`: a small company on the in-process manager (`World`, `build_world`) and `World.refused`, the
  check that a refused request answered why and changed nothing.
"""
