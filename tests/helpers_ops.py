"""Helpers for the operations tests (metrics, admin API, logs): the HTTP endpoints of a running
`eir serve`, read with httpx, and Prometheus' text format parsed by prometheus-client's parser.
"""

from __future__ import annotations

import time
from typing import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

METRICS_LINE = r"metrics served on (http://\S+)/metrics"
API_LINE = r"admin API served on (http://\S+)/ "
TOKEN = "test-token-0123456789abcdef"  # passed as EIR_API_TOKEN


def endpoint(server, pattern: str) -> str:
    """The base URL a running server logged for one of its HTTP endpoints."""
    return server.wait_for_log(pattern, timeout=15).group(1)


def scrape(metrics_url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} of one GET /metrics."""
    response = httpx.get(f"{metrics_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value; fails with the samples of that name when it is missing."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        found = [dict(k[1]) for k in samples if k[0] == name]
        raise AssertionError(f"no sample {name}{labels}; {name} has {found}")
    return samples[key]


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0,
               interval: float = 0.05):
    """Poll `condition` until it returns something true (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {result!r})")
        time.sleep(interval)


def scrape_until(metrics_url: str, predicate: Callable[[dict], bool], what: str,
                 timeout: float = 10.0) -> dict:
    """Scrape until `predicate(samples)` holds; those samples."""
    def attempt():
        samples = scrape(metrics_url)
        return samples if predicate(samples) else None
    return wait_until(attempt, what, timeout)


def authorised(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
