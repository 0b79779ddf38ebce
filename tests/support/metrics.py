"""Prometheus metrics as tests read them: scraped, parsed by prometheus-client's own parser.

`Samples` maps each sample (`policycast_heartbeats_total{outcome="changed"}` as name and labels) to its
value; `value(name, **labels)` reads one (0 when absent, as a counter not incremented yet reads),
`total(name)` adds up every sample of a name whatever its labels.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Samples:
    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        return sum(value for (sample, _), value in self.samples.items() if sample == name)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def scrape(client: httpx.Client | Any, url: str = "/metrics") -> Samples:
    """GET the metrics (any httpx client, a TestClient too) and parse them."""
    response = client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return Samples(response.text)
