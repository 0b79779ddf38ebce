"""The servers benchmarks 2 and 3 load: each a process of its own (in its own process group, so that
uvicorn and its workers stop together), its output in a log file.

- `manager_server`: `policycast serve --workers N`, as operators run it, from this checkout or another
  one (`--manager-root`: e.g. a `git worktree` of an older commit), on a fresh data directory with a
  known bootstrap admin key (`ADMIN_KEY`).
- `baseline_server`: uvicorn serving `bench.baseline_app` the way `policycast serve` serves the manager.

Both serve HTTPS by default, as `policycast serve` does, with certificates from one CA made for the run
(`BenchTls`): each `Server` carries the client context that trusts it (`ssl_context`). `tls=None`
measures plain HTTP, for the figures from before TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

from bench.checkout import ROOT, child_env
from fabric_core.tls import CertificateFiles, ManagerCA, client_context
from local_stack.manager import pick_port

ADMIN_KEY = "pck_bench-admin-key"


class BenchTls:
    """One CA for a run: the manager's (made in its data directory before it starts, as a first start
    would) also issues the baselines' certificates, so that every server under test speaks the same
    TLS."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = ManagerCA.load_or_create(directory / "tls")
        self.client = client_context(self.ca.certificate_pem)

    def server_files(self, name: str) -> CertificateFiles:
        return self.ca.server_files(self.directory / "tls", name, ["127.0.0.1", "localhost"])


class Server:
    """A server under test in its own process group, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_dir: Path,
        port: int,
        root: Path = ROOT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        """What a client trusts the server with; None: it serves plain HTTP."""
        self.name = name
        self.root = root
        self.argv = argv
        self.env = env
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout: float = 60) -> Server:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # its own process group: uvicorn and its workers stop together
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen within {timeout}s:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)  # its own group: uvicorn and its workers
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.popen = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def manager_server(
    workdir: Path,
    workers: int,
    database_url: str | None = None,
    root: Path = ROOT,
    *,
    tls: BenchTls | None = None,
) -> Server:
    """`policycast serve`, from this checkout or from `root` (another one, e.g. an older commit's);
    HTTPS with `tls` (its data directory must be `tls.directory`), else plain HTTP."""
    if tls is not None and not (root / "fabric_core" / "tls.py").exists():
        # Such a checkout ignores POLICYCAST_TLS_ENABLED and would serve plain HTTP to a TLS client.
        raise ValueError(f"{root} predates HTTPS in `policycast serve`: measure it with plain HTTP")
    port = pick_port(0)
    data_dir = tls.directory if tls is not None else workdir / f"manager-{workers}w"
    settings = {"POLICYCAST_DATA_DIR": str(data_dir), "POLICYCAST_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY}
    settings["POLICYCAST_TLS_ENABLED"] = "true" if tls is not None else "false"
    if database_url:
        settings["POLICYCAST_DATABASE_URL"] = database_url
    argv = [sys.executable, "-m", _policycast_module(root), "serve", "--port", str(port)]
    argv += ["--workers", str(workers), "--log-level", "warning"]
    context = tls.client if tls is not None else None
    return Server(f"manager-{workers}w", argv, child_env(root, settings), workdir, port, root, context)


def manager_tls(workdir: Path, workers: int) -> BenchTls:
    """The TLS of the manager with `workers` workers (its data directory's CA)."""
    return BenchTls(workdir / f"manager-{workers}w")


def _policycast_module(root: Path) -> str:
    """The module that runs the `policycast` command in `root`: `local_stack` (the command's composition
    root), or `api` in checkouts older than it."""
    return "local_stack" if (root / "local_stack" / "__main__.py").exists() else "api"


def baseline_server(
    workdir: Path, workers: int, *, floor: bool = False, tls: BenchTls | None = None
) -> Server:
    """uvicorn as `policycast serve` runs it: same loop, HTTP parser, log level, no access log, and TLS
    (with `tls`) with a certificate of the same kind from the same CA."""
    port = pick_port(0)
    target = ["bench.baseline_app:asgi_floor"] if floor else ["--factory", "bench.baseline_app:create"]
    argv = [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    name = f"{'asgi-floor' if floor else 'fastapi-baseline'}-{workers}w"
    if tls is not None:
        files = tls.server_files(name)
        argv += ["--ssl-certfile", str(files.certfile), "--ssl-keyfile", str(files.keyfile)]
    context = tls.client if tls is not None else None
    return Server(name, argv, child_env(settings={}), workdir, port, ssl_context=context)


def tls_session(server: Server) -> dict[str, Any] | None:
    """What a client of `server` negotiates (protocol, cipher, certificate key), to show that the
    servers compared speak the same TLS; None over plain HTTP."""
    if server.ssl_context is None:
        return None
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        server.ssl_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cipher = tls.cipher()
        der = tls.getpeercert(binary_form=True)
        assert cipher is not None and der is not None
        key = x509.load_der_x509_certificate(der).public_key()
        curve = getattr(getattr(key, "curve", None), "name", type(key).__name__)
        return {"version": tls.version(), "cipher": cipher[0], "certificate_key": curve}


async def wait_healthy(server: Server, within: float = 60) -> None:
    """Until the server's `GET /healthz` answers 200."""
    url = server.url
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2, verify=server.ssl_context or True) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/healthz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not healthy within {within}s")
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[None]:
    """The servers started, in order, for the time of the block; all stopped after it."""
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()
