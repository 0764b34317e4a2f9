"""The LitServer of `fmnist serve`, put together: the API in its inference workers, the front desk before every
route, GET /metrics, JSON errors; and a LitServer that says when it is ready."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from fmnist_lightning.serving.api import MAX_IMAGES_PER_REQUEST, ClassifierAPI
from fmnist_lightning.serving.front_desk import FrontDesk, error_as_json
from fmnist_lightning.serving.info import limits_info
from fmnist_lightning.serving.metrics import exposition


@dataclass(frozen=True)
class ServeSettings:
    """`fmnist serve`'s options, checked."""

    model_file: Path
    info: dict[str, Any]  # GET /info's "model"
    top_k: int = 3
    workers: int = 1
    threads: int = 1
    max_batch_size: int = 32
    batch_timeout: float = 0.002
    timeout: float = 30.0
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    accelerator: str = "cpu"


class AnnouncingServer(ls.LitServer):
    """Prints one line once a worker has loaded the model, the moment /health turns 200."""

    announcement = ""

    def verify_worker_status(self) -> None:
        try:
            super().verify_worker_status()
        except BaseException:  # Ctrl-C or SIGTERM while loading: LitServer.run stops its processes only later
            self._perform_graceful_shutdown(self.transport_config.manager, {}, "keyboard_interrupt")
            raise
        if self.announcement:
            print(self.announcement, flush=True)


async def metrics_route(request: Request) -> Response:
    body, content_type = exposition()
    return Response(body, media_type=content_type)


def build_server(settings: ServeSettings, api: ls.LitAPI | None = None) -> AnnouncingServer:
    """The server for `settings`; `api` replaces the classifier (the benchmark's constant endpoint)."""
    api = api or ClassifierAPI(
        settings.model_file, settings.top_k, settings.threads, settings.max_batch_size, settings.batch_timeout
    )
    info = settings.info | {
        "top_k": settings.top_k,
        "batching": {"max_batch_size": settings.max_batch_size, "batch_timeout": settings.batch_timeout},
        "limits": limits_info(settings.max_body_bytes, MAX_IMAGES_PER_REQUEST),
        "api_key_required": settings.api_key is not None,
    }
    server = AnnouncingServer(
        api,
        accelerator=settings.accelerator,
        workers_per_device=settings.workers,
        timeout=settings.timeout,
        model_metadata=info,
        middlewares=[(FrontDesk, {"api_key": settings.api_key, "max_body_bytes": settings.max_body_bytes})],
        disable_openapi_url=True,  # its /docs page loads scripts from the internet
    )
    server.app.add_api_route("/metrics", metrics_route, methods=["GET"])
    server.app.add_exception_handler(HTTPException, error_as_json(settings.timeout))
    return server
