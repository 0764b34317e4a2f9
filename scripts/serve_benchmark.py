"""`fmnist serve` under load: requests/s and latency over real HTTP on the loopback, with ratios from the same run.

Usage: .venv/bin/python scripts/serve_benchmark.py --ckpt_path last [--requests 1500] [--seconds 15] [--threads N]
[--json out.json]

Servers, started one at a time and each stopped before the next starts:

- `batching`: `fmnist serve --max_batch_size 32 --batch_timeout 0.002` (the defaults);
- `no batching`: `fmnist serve --max_batch_size 1`;
- `bare` (both settings): the same LitServer stack (front desk, metrics, one inference worker, the same upload of
  the same PNG) with an API that answers a constant: what HTTP, form parsing and LitServe's queues cost alone.

Each server answers concurrency 1, 8 and 32 in turn: 50 warm-up requests, then at most `--requests` requests or
`--seconds` seconds. The client is one asyncio process (httpx) on the same 2 cores as the server: it takes CPU
from the server, so these are figures for client and server on one small machine, not a server's ceiling.

In-process figures from the same run: decoding the PNG (`predict`'s preparation), and the model's
`probabilities` at batch 1 and 32, in this process with the server stopped.
"""

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
import litserve as ls
import numpy as np
from PIL import Image
from starlette.responses import JSONResponse, Response

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)
SERVERS = {"batching": ["--max_batch_size", "32"], "no batching": ["--max_batch_size", "1"]}
WARM_UP = 50


class ConstantAPI(ls.LitAPI):
    """Answers every upload with the same prediction, without decoding it or running a model."""

    ANSWER: ClassVar[dict[str, Any]] = {"file": "body", "predicted_class": "Ankle boot", "predicted_index": 9}

    def setup(self, device: str) -> None:
        pass

    def decode_request(self, request) -> None:  # no annotation: LitServe would read it as the body type
        return None

    def predict(self, x: Any) -> Any:
        return [self.ANSWER] * len(x) if isinstance(x, list) else self.ANSWER

    def encode_response(self, output: dict[str, Any]) -> Response:
        return JSONResponse(output)


def bare_server(port: int, max_batch_size: int) -> None:
    """The constant endpoint on the server stack of `fmnist serve` (run in its own process)."""
    from fmnist_lightning.commands.serve import run_until_stopped
    from fmnist_lightning.serving.metrics import count_into

    count_into(Path(tempfile.mkdtemp(prefix="serve-benchmark-metrics-")))
    from fmnist_lightning.serving.server import ServeSettings, build_server

    settings = ServeSettings(model_file=Path("constant"), info={}, max_batch_size=max_batch_size)
    api = ConstantAPI(max_batch_size=max_batch_size, batch_timeout=settings.batch_timeout if max_batch_size > 1 else 0)
    server = build_server(settings, api)
    server.announcement = "bare server ready"
    run_until_stopped(server, "127.0.0.1", port)


def test_image_png(data_dir: str) -> bytes:
    """The first official test image as a PNG file (about 400 bytes), what a client would upload."""
    from fmnist_lightning.data.datamodule import official_test_set

    pixels = official_test_set(data_dir).images[0, 0].numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def load(url: str, upload: bytes, concurrency: int, requests: int, seconds: float) -> dict[str, Any]:
    """`concurrency` clients posting the upload back to back; latency of each answered request."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                response = await client.post("/predict", files={"file": ("image.png", upload, "image/png")})
            except httpx.TransportError:  # a connection the server reset: counted, not timed
                errors += 1
                return
            latencies.append(time.perf_counter() - started)
            errors += response.status_code != 200

        async def worker(count: int, deadline: float) -> None:
            for _ in range(count):
                if time.perf_counter() > deadline:
                    return
                await one()

        warm = [worker(max(1, WARM_UP // concurrency), float("inf")) for _ in range(concurrency)]
        await asyncio.gather(*warm)
        latencies.clear()
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(worker(requests // concurrency, deadline) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(ordered),
        "errors": errors,
        "requests_per_s": len(ordered) / elapsed,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve_benchmark: the server exited ({process.returncode}):\n{process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("serve_benchmark: the server did not become ready")


def measure_server(command: list[str], port: int, upload: bytes, args: argparse.Namespace) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_ready(url, process)
        return [asyncio.run(load(url, upload, c, args.requests, args.seconds)) for c in CONCURRENCY]
    finally:
        process.terminate()
        process.wait(60)


def in_process(ckpt_path: Path, upload: bytes, threads: int | None, repeats: int = 200) -> dict[str, float]:
    """Seconds per image: decoding the upload, and the model at batch 1 and 32 (as the worker runs it)."""
    import torch

    from fmnist_lightning.data.decode import load_image
    from fmnist_lightning.serving.api import default_threads, torch_runner

    torch.set_num_threads(threads or default_threads(1))
    started = time.perf_counter()
    for _ in range(repeats):
        pixels = load_image(io.BytesIO(upload))
    decode = (time.perf_counter() - started) / repeats
    run = torch_runner(ckpt_path, "cpu")
    per_image = {}
    for batch in (1, 32):
        images = np.repeat(pixels[None], batch, axis=0)
        run(images)  # warm-up
        times = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(max(1, repeats // batch)):
                run(images)
            times.append((time.perf_counter() - started) / (max(1, repeats // batch) * batch))
        per_image[batch] = statistics.median(times)
    return {"decode_s": decode, "model_batch1_s": per_image[1], "model_batch32_s": per_image[32]}


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| server | concurrency | requests/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        for row in rows:
            lines.append(
                f"| {name} | {row['concurrency']} | {row['requests_per_s']:.0f} | {row['p50_ms']:.1f} | "
                f"{row['p99_ms']:.1f} | {row['errors']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="last", help="checkpoint, or last/best of the newest run")
    parser.add_argument("--requests", type=int, default=1500, help="requests per concurrency level, at most")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per concurrency level, at most")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--data_dir", default="data", help="Fashion-MNIST folder (for the uploaded test image)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--threads", type=int, help="fmnist serve --threads (default: its own, the cores)")
    parser.add_argument("--bare-server", type=int, metavar="MAX_BATCH_SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server is not None:
        bare_server(args.port, args.bare_server)
        return

    from fmnist_lightning.commands.described import resolve_checkpoint

    ckpt_path = resolve_checkpoint(args.ckpt_path, REPO / "runs").resolve()
    upload = test_image_png(args.data_dir)
    fmnist = [sys.executable, "-m", "fmnist_lightning", "serve", "--ckpt_path", str(ckpt_path), "--port"]
    results: dict[str, list[dict[str, Any]]] = {}
    for name, options in SERVERS.items():
        threads = ["--threads", str(args.threads)] if args.threads else []
        results[name] = measure_server([*fmnist, str(args.port), *options, *threads], args.port, upload, args)
        bare = [sys.executable, __file__, "--port", str(args.port), "--bare-server", options[-1]]
        results[f"bare, {name}"] = measure_server(bare, args.port, upload, args)
    costs = in_process(ckpt_path, upload, args.threads)

    print(table(results))
    print(f"\nin process: decoding {costs['decode_s'] * 1e3:.2f} ms/image, model {costs['model_batch1_s'] * 1e3:.2f} "
          f"ms/image at batch 1, {costs['model_batch32_s'] * 1e3:.3f} ms/image at batch 32")  # fmt: skip
    in_process_rate = {"batching": 1 / (costs["decode_s"] + costs["model_batch32_s"]),
                       "no batching": 1 / (costs["decode_s"] + costs["model_batch1_s"])}  # fmt: skip
    print("\n| server | concurrency | served / in-process (decode + model) | served / bare endpoint |")
    print("|---|---:|---:|---:|")
    ratios = []
    for name in SERVERS:
        for served, bare in zip(results[name], results[f"bare, {name}"], strict=True):
            to_model = served["requests_per_s"] / in_process_rate[name]
            to_bare = served["requests_per_s"] / bare["requests_per_s"]
            ratios.append({"server": name, "concurrency": served["concurrency"], "to_in_process": to_model,
                           "to_bare": to_bare})  # fmt: skip
            print(f"| {name} | {served['concurrency']} | {to_model:.3f} | {to_bare:.2f} |")
    print(f"\n({os.cpu_count()} cores, client and server on the same machine)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "in_process": costs, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
