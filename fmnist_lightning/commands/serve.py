"""`fmnist serve`: a checkpoint (or its ONNX export) behind HTTP on LitServe. Every refusal of the command comes
before anything is started; Ctrl-C and SIGTERM stop the workers and exit 0, leaving nothing behind."""

import math
import os
import shutil
import signal
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.addresses import check_port, ensure_port_free, host_family, is_loopback
from fmnist_lightning.commands.described import LoadedCheckpoint, describe_checkpoint, resolve_checkpoint
from fmnist_lightning.errors import UserError
from fmnist_lightning.serving.info import package_version

DEFAULT_PORT = 8000
KEY_VARIABLE = "FMNIST_API_KEY"
MIN_KEY_LENGTH = 16
# LitServer.run binds these only; a server for other machines listens on all of their networks.
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve_command(args: list[str]) -> None:
    """`fmnist serve --ckpt_path CKPT`: POST /predict, GET /health, /info and /metrics on LitServe."""
    config = parse(args)
    if find_spec("litserve") is None or find_spec("prometheus_client") is None:  # found, not imported (see below)
        raise UserError("serving needs LitServe: pip install -e '.[serve]' (scripts/setup.sh installs it)")
    api_key = checked_api_key(config.api_key or os.environ.get(KEY_VARIABLE), config.host)
    model_file, info = load_model_info(config.ckpt_path, Path(config.runs_dir))
    ensure_port_free(config.host, config.port)
    metrics_folder = Path(tempfile.mkdtemp(prefix="fmnist-serve-metrics-"))
    try:
        from fmnist_lightning.serving.metrics import count_into

        count_into(metrics_folder)  # before prometheus_client is imported by the server's modules
        from fmnist_lightning.serving.api import default_threads
        from fmnist_lightning.serving.server import ServeSettings, build_server

        settings = ServeSettings(
            model_file=model_file,
            info=info,
            top_k=config.top_k,
            workers=config.workers,
            threads=config.threads or default_threads(config.workers),
            max_batch_size=config.max_batch_size,
            batch_timeout=config.batch_timeout,
            timeout=config.timeout,
            api_key=api_key,
            max_body_bytes=int(config.max_body_mb * 2**20),
            accelerator=config.accelerator,
        )
        server = build_server(settings)
        shown_host = f"[{config.host}]" if ":" in config.host else config.host
        server.announcement = (
            f"serving:          http://{shown_host}:{config.port}/predict ({model_file.name}; "
            "GET /health, /info, /metrics; Ctrl-C to stop)"
        )
        run_until_stopped(server, config.host, config.port)
    finally:
        shutil.rmtree(metrics_folder, ignore_errors=True)


def parse(args: list[str]) -> Any:
    parser = ArgumentParser(prog="fmnist serve", description=serve_command.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint (.ckpt), last/best of the newest run, or .onnx")
    parser.add_argument("--host", default="127.0.0.1", help=f"one of {', '.join(HOSTS)}; not 127.0.0.1 needs a key")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on (1024-65535)")
    parser.add_argument("--max_batch_size", type=int, default=32, help="requests scored together; 1: no batching")
    parser.add_argument("--batch_timeout", type=float, default=0.002, help="seconds a batch waits to fill up")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--threads", type=int, help="threads per worker (default: the cores shared among workers)")
    parser.add_argument("--top_k", type=int, default=3, help="classes listed per image")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait before a 504")
    parser.add_argument("--max_body_mb", type=float, default=4.0, help="largest request body, in MiB")
    parser.add_argument("--api_key", help=f"key every route but /health asks for (or set {KEY_VARIABLE})")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "cuda", "auto"), help="where workers run")
    parser.add_argument("--runs_dir", default="runs", help="folder of runs for last/best")
    config = parser.parse_args(args)
    check_port(config.port, lowest=1024)
    if config.host not in HOSTS:
        host_family(config.host)  # an address that is none gets the demo's own refusal
        raise UserError(
            f"--host {config.host}: LitServe serves on {', '.join(HOSTS)} only; 127.0.0.1 is this machine only, "
            "0.0.0.0 and :: are every network (with --api_key)"
        )
    for name, lowest in (("max_batch_size", 1), ("workers", 1), ("threads", 1)):
        value = getattr(config, name)
        if value is not None and value < lowest:
            raise UserError(f"--{name} must be at least {lowest}, got {value}")
    if not 1 <= config.top_k <= len(CLASS_NAMES):
        raise UserError(f"--top_k must be between 1 and {len(CLASS_NAMES)}, got {config.top_k}")
    for name, zero_allowed in (("batch_timeout", True), ("timeout", False), ("max_body_mb", False)):
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
            bound = "at least" if zero_allowed else "above"
            raise UserError(f"--{name} must be a finite number {bound} 0, got {value}")
    if config.batch_timeout >= config.timeout:
        raise UserError(f"--batch_timeout {config.batch_timeout:g} must be shorter than --timeout {config.timeout:g}")
    return config


def checked_api_key(key: str | None, host: str) -> str | None:
    """The key, refused when too short to guess slowly; none is only allowed on the loopback address."""
    if key is None:
        if not is_loopback(host):
            raise UserError(
                f"--host {host} lets other machines in: give --api_key KEY or set {KEY_VARIABLE} (make one with: "
                'python -c "import secrets; print(secrets.token_urlsafe(24))")'
            )
        return None
    if len(key) < MIN_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise UserError(
            f"the API key must be at least {MIN_KEY_LENGTH} printable ASCII characters, got {len(key)}; make one with: "
            'python -c "import secrets; print(secrets.token_urlsafe(24))"'
        )
    return key


def checkpoint_info(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """GET /info's model: the checkpoint's recipe, parameters, temperature and its run's test accuracy."""
    return {
        "model_file": str(loaded.path),
        "format": "checkpoint",
        "recipe": loaded.recipe,
        "parameters": loaded.parameters,
        "test_accuracy": loaded.test_accuracy,
        "temperature": loaded.model.temperature,
        "class_names": list(CLASS_NAMES),
        "package_version": package_version(),
    }


def load_model_info(ckpt_path: str, runs_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The model file and GET /info's description; a missing, foreign or unreadable file is refused here."""
    path = resolve_checkpoint(ckpt_path, runs_dir)
    if path.suffix == ".onnx":
        from fmnist_lightning.serving.info import onnx_info

        if not path.is_file():
            raise UserError(f"--ckpt_path {path}: no such file")
        return path.resolve(), onnx_info(path)
    return path.resolve(), checkpoint_info(describe_checkpoint(path))


def run_until_stopped(server: Any, host: str, port: int) -> None:
    """LitServer.run until Ctrl-C or SIGTERM, which only this process acts on; LitServe then stops its HTTP and
    inference processes itself (a Ctrl-C reaching them too would cut their queue messages in half)."""
    command = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != command:  # a process LitServe forked (HTTP server, queue manager): stopped from here,
            return  # in order, also when a signal reaches them all (systemd, pkill, Ctrl-C)
        for name in STOP_SIGNALS:  # a second one must not cut the shutdown short
            signal.signal(name, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {name: signal.signal(name, stop) for name in STOP_SIGNALS}
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    except KeyboardInterrupt:  # before LitServe's own handler was reached (workers still loading)
        pass
    finally:
        for name, handler in previous.items():
            signal.signal(name, handler)
