"""The manager and the bridge of the local stack, on threads of this process, and their ports."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time

import uvicorn

from api.fabric import Fabric
from broker_bridge.engine import engine_for
from broker_bridge.service import Bridge, BridgeThread, connect_link
from fabric_core.settings import Settings
from fabric_core.tls import manager_tls
from local_stack.composition import manager_app


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pick_port(port: int) -> int:
    if port and port_is_free(port):
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def admin_key_for(settings: Settings) -> str:
    """The bootstrap key from settings, or one made for this data directory and kept there (0600)."""
    if settings.bootstrap_admin_key is not None:
        return settings.bootstrap_admin_key.get_secret_value()
    path = settings.data_dir / "admin_key"
    if path.exists():
        return path.read_text().strip()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = f"pck_{secrets.token_urlsafe(32)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


class ManagerThread:
    """The manager's uvicorn server on a background thread of this process."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.app = manager_app(settings)
        tls = manager_tls(settings) if settings.tls_enabled else None
        self.ca_hash = tls.ca_hash if tls is not None else None
        """What agents pin (None: plain HTTP)."""
        self.trust_pem = tls.trust_pem if tls is not None else None
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ssl_certfile=tls.files.certfile if tls else None,
            ssl_keyfile=tls.files.keyfile if tls else None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="manager", daemon=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the manager did not start; see the messages above")
            time.sleep(0.05)

    @property
    def fabric(self) -> Fabric:
        fabric: Fabric = self.app.state.fabric
        return fabric

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_bridge(settings: Settings, manager: ManagerThread) -> BridgeThread:
    fabric = manager.fabric
    broker = engine_for(settings, fabric.signing_key)
    link = connect_link(settings, broker)
    bridge = Bridge(settings=settings, engine=fabric.engine, broker=broker, link=link)
    return BridgeThread(bridge).start()
