"""The manager's commands: `policycast serve` and `policycast plan` (registered by the root,
`local_stack.cli`, with the admin commands of `api.admin_cli`).

Every command builds `Settings` once from the environment and passes it down. Errors an operator can
act on are printed as one line on stderr with a non-zero exit, never as a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from fabric_core.console import fail, load_settings, stderr, stdout
from fabric_core.settings import Settings
from fabric_core.tls import CertificateFiles, manager_tls
from manager_db.database import describe, guarded, make_engine, migrate


def serve_command(asgi_factory: str) -> Callable[..., None]:
    """`policycast serve`, whose workers each build their app with `asgi_factory` ("module:function").

    The composition root (`local_stack.cli`) names the factory that composes the app with the broker
    engine, so that the api need not import the bridge.
    """

    def serve(
        host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
        workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
        log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    ) -> None:
        """Migrate the database and serve the admin and agent APIs."""
        import uvicorn

        settings = load_settings(Settings)
        guarded(lambda: migrate(make_engine(settings.resolved_database_url)), "migrating the database")
        where = describe(settings.resolved_database_url)
        certificates = _certificates(settings)
        scheme = "https" if certificates is not None else "http"
        stdout.print(f"Policycast manager on {scheme}://{host}:{port} (API docs at /docs), database {where}")
        uvicorn.run(
            asgi_factory,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            access_log=False,
            server_header=False,  # 17 bytes on every heartbeat answer, for nobody (docs/performance.md)
            ssl_certfile=None if certificates is None else str(certificates.certfile),
            ssl_keyfile=None if certificates is None else str(certificates.keyfile),
        )

    return serve


def _certificates(settings: Settings) -> CertificateFiles | None:
    """uvicorn's TLS options: the api's certificate (from the manager's CA, made at first start, or the
    operator's own); none, with a warning, when POLICYCAST_TLS_ENABLED=false."""
    if not settings.tls_enabled:
        stderr.print(
            "[yellow]warning:[/] POLICYCAST_TLS_ENABLED=false: serving plain HTTP. Agent secrets, API keys "
            "and broker passwords travel in clear unless a TLS-terminating proxy is in front.",
            soft_wrap=True,
        )
        return None
    tls = guarded(lambda: manager_tls(settings), "preparing TLS")
    stdout.print(f"TLS: {tls.files.certfile} for {settings.tls_names}; agents pin the CA {tls.ca_hash}")
    return tls.files


class ModeChoice(StrEnum):
    push = "push"
    pull = "pull"


class EngineChoice(StrEnum):
    mosquitto = "mosquitto"
    nats = "nats"


def plan(
    agents: Annotated[int, typer.Option(min=0, help="how many agents")],
    mode: Annotated[ModeChoice, typer.Option(help="push (MQTT) or pull (heartbeats only)")] = ModeChoice.push,
    heartbeat: Annotated[str, typer.Option(help="heartbeat interval: 300s, 5m, 1h")] = "5m",
    utilisation: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="plan api cores to run at this share of capacity")
    ] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    engine: Annotated[
        EngineChoice | None,
        typer.Option(help="the push broker: mosquitto (one node) or nats (a cluster); default: the setting"),
    ] = None,
    broker_nodes: Annotated[
        int | None, typer.Option(min=1, help="broker nodes (nats; default 3, mosquitto is always 1)")
    ] = None,
) -> None:
    """Request rate, bandwidth, broker connections and api cores for a fleet, from measured costs;
    in push mode also the broker's nodes, memory, failover and authorisation, per engine."""
    import json

    from api.broker_capacity import Engine as BrokerEngineName
    from api.broker_capacity import broker_costs, broker_plan, describe_broker
    from api.capacity import describe, measured_costs, parse_duration
    from api.capacity import plan as make_plan

    try:
        interval = parse_duration(heartbeat)
    except ValueError as exc:
        fail(str(exc))
    costs = measured_costs()
    result = make_plan(agents, mode.value, interval, costs=costs, utilisation=utilisation)
    chosen: BrokerEngineName = engine.value if engine is not None else load_settings(Settings).broker_engine
    broker = None
    if mode is ModeChoice.push:
        try:
            broker = broker_plan(agents, chosen, nodes=broker_nodes)
        except ValueError as exc:
            fail(str(exc))
    if as_json:
        out: dict[str, object] = {"plan": result.as_dict(), "costs": vars(costs)}
        if broker is not None:
            out["broker"] = broker.as_dict()
            out["broker_costs"] = vars(broker_costs()[broker.engine])
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    table = Table(show_header=False, box=None)
    lines = describe(result, costs)
    if broker is not None:
        lines[-1:-1] = describe_broker(broker, broker_costs()[broker.engine])
    for what, value in lines:
        table.add_row(f"[bold]{what}[/]", value)
    stdout.print(table)
