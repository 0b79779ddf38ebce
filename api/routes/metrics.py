"""GET /metrics: the api's Prometheus metrics (`api.metrics`), for Prometheus to scrape.

Outside `/api/v1` and `/agent/v1`, so it takes no credentials (a scraper holds none): operators keep it
from the world at the network layer (docs/operations.md, "Metrics"). Not in the OpenAPI document: it
is no part of the REST contract. A plain function: FastAPI runs it in the thread pool, where the
scrape-time queries (agents, outbox) cannot stall the event loop the heartbeats are answered on.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.fabric import Fabric

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    fabric: Fabric = request.app.state.fabric
    body, content_type = fabric.metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
