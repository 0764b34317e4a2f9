"""`fmnist serve`'s Prometheus metrics. LitServe answers HTTP in processes it forks and runs the model in processes
it spawns, so every process counts into files of one folder and /metrics adds them up (prometheus-client's
multiprocess mode). The folder must be named before prometheus_client is first imported: it picks its store then."""

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

FOLDER_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
ROUTES = frozenset({"/predict", "/health", "/info", "/metrics"})  # any other path is counted as "other"
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def count_into(folder: Path) -> None:
    """Every process started from now on (and this one, if it has not imported prometheus_client) counts there."""
    os.environ[FOLDER_VARIABLE] = str(folder)


class ServerMetrics(NamedTuple):
    requests: "Counter"
    latency: "Histogram"
    batch_size: "Histogram"
    images: "Counter"


@cache
def server_metrics() -> ServerMetrics:
    """This process's metric objects, made once (a forked process keeps its parent's and counts in its own file)."""
    if FOLDER_VARIABLE not in os.environ:
        raise RuntimeError(f"{FOLDER_VARIABLE} is not set: call count_into(folder) before serving")
    from prometheus_client import Counter, Histogram

    return ServerMetrics(
        requests=Counter("fmnist_http_requests", "HTTP requests answered", ["route", "status"]),
        latency=Histogram("fmnist_http_request_seconds", "Time to answer", ["route"], buckets=LATENCY_BUCKETS),
        batch_size=Histogram("fmnist_inference_batch_images", "Images per forward pass", buckets=BATCH_BUCKETS),
        images=Counter("fmnist_images", "Images received", ["outcome"]),
    )


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


def exposition() -> tuple[bytes, str]:
    """The metrics of every process in Prometheus's text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
