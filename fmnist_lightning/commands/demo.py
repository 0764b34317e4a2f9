"""`fmnist demo`: a local Gradio app to try a checkpoint on pictures, explore its test-set mistakes and compare
runs. Offline by design: no telemetry, no share links, no fonts or scripts fetched from the internet."""

import errno
import ipaddress
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.demo_app import LoadedCheckpoint, ScoredTestSet, build_app, probabilities_of
from fmnist_lightning.data.datamodule import official_test_set
from fmnist_lightning.data.files import SYSTEM_DATA_DIR
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.reports.metrics_log import METRICS_FILE, read_run
from fmnist_lightning.training.run_folders import find_run_checkpoint
from fmnist_lightning.training.settings import AUGMENTATION_SETTINGS, Kind, model_settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Named on their own in the recipe line: the network, the optimizer and the calibration.
OWN_PLACE_IN_RECIPE = frozenset({"architecture", "optimizer", "temperature"})


def resolve_checkpoint(ckpt_path: str, runs_dir: Path) -> Path:
    """`last`/`best`: that checkpoint of the newest run under `runs_dir` (any run name); else the path itself."""
    return find_run_checkpoint(runs_dir, ckpt_path) if ckpt_path in ("last", "best") else Path(ckpt_path)


def load_for_demo(path: Path) -> LoadedCheckpoint:
    """The model in eval mode (float32, CPU) with its recipe and, when its run tested it, its test accuracy."""
    model, checkpoint = FashionMNISTClassifier.from_checkpoint(path)
    settings = checkpoint.get("hyper_parameters") or {}
    defaults = FashionMNISTClassifier.default_settings()
    recipe_settings = set(model_settings(Kind.MODEL, Kind.RUN)) - OWN_PLACE_IN_RECIPE
    changed = [name for name in sorted(recipe_settings & settings.keys()) if settings[name] != defaults.get(name)]
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    if any(data.get(name) for name in AUGMENTATION_SETTINGS):
        changed.append("augmentation")
    optimizer = (settings.get("optimizer") or {}).get("class_path", "torch.optim.Adam").rsplit(".", 1)[-1]
    recipe = f"{settings.get('architecture', 'original')} network, {optimizer}"
    recipe += f", improved recipe ({', '.join(changed)})" if changed else ", the original recipe"
    if model.temperature != 1:
        recipe += f", calibrated (temperature {model.temperature:.3f})"
    return LoadedCheckpoint(
        model=model,
        path=path,
        recipe=recipe,
        test_accuracy=_tested_accuracy(path),
        data_dir=str(data.get("data_dir", "data")),
        system_dir=str(data.get("system_dir", SYSTEM_DATA_DIR)),
    )


def _tested_accuracy(checkpoint_path: Path) -> float | None:
    """The test accuracy in the checkpoint's run's metrics.csv, if that run was tested."""
    metrics_file = checkpoint_path.parent.parent / METRICS_FILE
    try:
        return read_run(metrics_file).final.get("test_acc") if metrics_file.is_file() else None
    except UserError:
        return None


def predict_test_set(loaded: LoadedCheckpoint, data_dir: str | None = None) -> ScoredTestSet:
    """Score the official test set once at start-up; never downloads (the demo works offline)."""
    folder = data_dir or loaded.data_dir
    test = official_test_set(folder, loaded.system_dir)
    return ScoredTestSet(test.images, test.labels, probabilities_of(loaded.model, test.images))


# A host name: dot-separated labels of letters, digits and inner hyphens (RFC 1123).
HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}$){HOST_LABEL}(\.{HOST_LABEL})*")


def host_family(host: str) -> socket.AddressFamily:
    """The address family to serve `host` on; a value that is no IP address or host name is refused."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        pass
    numeric = all(label.isdigit() for label in host.split("."))  # 999.1.2.3 is a bad address, not a name
    if not HOST_NAME.fullmatch(host) or numeric:
        raise UserError(
            f"--host {host!r} is not an address to serve on; give an IP address such as 127.0.0.1 (this machine "
            "only) or 0.0.0.0 (every network), or a host name"
        )
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: {error.strerror}; give an IP address such as 127.0.0.1") from None


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a host that is no address of this machine, or a port already in use, before anything starts."""
    with socket.socket(host_family(host)) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                hint = f"--host {host} is not an address of this machine; give 127.0.0.1 or 0.0.0.0"
            elif error.errno == errno.EACCES:
                hint = "ports below 1024 need root; choose another --port"
            else:
                hint = "choose another --port"
            raise UserError(f"cannot serve on {host}:{port}: {error.strerror}; {hint}") from None


@contextmanager
def offline_gradio() -> Iterator[Path]:
    """Gradio without telemetry or version checks, its uploads in a temporary folder removed afterwards."""
    temporary = Path(tempfile.mkdtemp(prefix="fmnist-demo-"))
    saved = {name: os.environ.get(name) for name in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR")}
    os.environ.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(temporary))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve(app: Any, host: str, port: int) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the server and return (the command exits 0)."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        app.launch(server_name=host, server_port=port, share=False, quiet=True, prevent_thread_lock=True,
                   ssr_mode=False, max_file_size="256mb", footer_links=[])  # fmt: skip
        print(f"demo:             http://{host}:{port} (Ctrl-C to stop)", flush=True)
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        signal.signal(signal.SIGTERM, previous)


def demo_command(args: list[str]) -> None:
    """`fmnist demo --ckpt_path CKPT`: a local web app to try the model, explore its mistakes, compare runs."""
    parser = ArgumentParser(prog="fmnist demo", description=demo_command.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint (.ckpt), or last/best of the newest run")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on")
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to serve on; 0.0.0.0 lets other machines in, with no login: only on a network you trust",
    )
    parser.add_argument("--runs_dir", default="runs", help="folder of runs for the Runs tab and last/best")
    parser.add_argument("--data_dir", help="Fashion-MNIST folder (default: the checkpoint's run's data.data_dir)")
    parser.add_argument("--top_k", type=int, default=3, help="classes shown per prediction")
    config = parser.parse_args(args)
    if not 0 < config.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {config.port}")
    if not 1 <= config.top_k <= len(CLASS_NAMES):
        raise UserError(f"--top_k must be between 1 and {len(CLASS_NAMES)}, got {config.top_k}")
    host_family(config.host)  # refuses a host that is no address, before the model is loaded
    with offline_gradio():  # before Gradio is imported: it reads these settings then
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserError("the demo needs Gradio: pip install -e '.[demo]' (scripts/setup.sh installs it)") from None
        runs_dir = Path(config.runs_dir)
        loaded = load_for_demo(resolve_checkpoint(config.ckpt_path, runs_dir))
        ensure_port_free(config.host, config.port)
        try:
            test_set: ScoredTestSet | str = predict_test_set(loaded, config.data_dir)
        except UserError as error:  # the other tabs still work
            test_set = str(error)
        serve(build_app(loaded, test_set, runs_dir, config.top_k), config.host, config.port)
