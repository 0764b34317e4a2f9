"""`fmnist demo`: a local Gradio app to try a checkpoint on pictures, explore its test-set mistakes and compare
runs. Offline by design: no telemetry, no share links, no fonts or scripts fetched from the internet."""

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.addresses import check_port, ensure_port_free, host_family
from fmnist_lightning.commands.demo_app import ScoredTestSet, build_app, probabilities_of
from fmnist_lightning.commands.described import LoadedCheckpoint, describe_checkpoint, resolve_checkpoint
from fmnist_lightning.data.datamodule import official_test_set
from fmnist_lightning.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def predict_test_set(loaded: LoadedCheckpoint, data_dir: str | None = None) -> ScoredTestSet:
    """Score the official test set once at start-up; never downloads (the demo works offline)."""
    folder = data_dir or loaded.data_dir
    test = official_test_set(folder, loaded.system_dir)
    return ScoredTestSet(test.images, test.labels, probabilities_of(loaded.model, test.images))


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
    check_port(config.port)
    if not 1 <= config.top_k <= len(CLASS_NAMES):
        raise UserError(f"--top_k must be between 1 and {len(CLASS_NAMES)}, got {config.top_k}")
    host_family(config.host)  # refuses a host that is no address, before the model is loaded
    with offline_gradio():  # before Gradio is imported: it reads these settings then
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserError("the demo needs Gradio: pip install -e '.[demo]' (scripts/setup.sh installs it)") from None
        runs_dir = Path(config.runs_dir)
        loaded = describe_checkpoint(resolve_checkpoint(config.ckpt_path, runs_dir))
        ensure_port_free(config.host, config.port)
        try:
            test_set: ScoredTestSet | str = predict_test_set(loaded, config.data_dir)
        except UserError as error:  # the other tabs still work
            test_set = str(error)
        serve(build_app(loaded, test_set, runs_dir, config.top_k), config.host, config.port)
