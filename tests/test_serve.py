"""`fmnist serve` in this process, through the server's ASGI app (as LitServe's own tests drive it, with a real
spawned inference worker): predictions, every bad input, the API-key rule, /health, /info and /metrics."""

import asyncio
import csv
import io
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.described import describe_checkpoint
from fmnist_lightning.serving import metrics
from helpers import declared_size_png, run_main, start_cli, tiny_fit_args, tree_snapshot, wait_for

ls = pytest.importorskip("litserve", reason="litserve not installed (pip install -e '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402 (litserve brings FastAPI)
from litserve.utils import wrap_litserve_start  # noqa: E402

KEY = "a-test-key-of-24-letters"
MAX_BODY = 256 * 1024


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def dark_shoe_on_white() -> np.ndarray:
    pixels = np.full((40, 60), 250, dtype=np.uint8)
    pixels[15:32, 5:55] = 40
    pixels[8:15, 35:55] = 60
    return pixels


@pytest.fixture(scope="module")
def metrics_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-metrics")
    metrics.count_into(folder)
    return folder


@contextmanager
def serving(settings):
    """The server's app with its worker running, and the first /health status, seen before the model was loaded."""
    from fmnist_lightning.serving.server import build_server

    with wrap_litserve_start(build_server(settings)) as server, TestClient(server.app) as client:
        first_health = client.get("/health").status_code
        wait_for(lambda: client.get("/health").status_code == 200, timeout=120, what="the model to load")
        yield client, first_health


@pytest.fixture(scope="module")
def served(tiny_checkpoint, metrics_folder):
    """A checkpoint served with batching, an API key, top 10 and a small body limit."""
    from fmnist_lightning.commands.serve import checkpoint_info
    from fmnist_lightning.serving.server import ServeSettings

    settings = ServeSettings(
        model_file=tiny_checkpoint, info=checkpoint_info(describe_checkpoint(tiny_checkpoint)), top_k=10,
        max_batch_size=8, batch_timeout=0.05, api_key=KEY, max_body_bytes=MAX_BODY,
    )  # fmt: skip
    with serving(settings) as (client, first_health):
        client.headers["X-API-Key"] = KEY
        yield client, first_health


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text format: `name{labels} value` per line, here keyed by the whole `name{labels}`."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def predict_file(client, name: str, data: bytes, content_type: str = "image/png"):
    return client.post("/predict", files={"file": (name, data, content_type)})


def test_health_turns_ready_once_the_model_is_loaded(served):
    client, first_health = served
    assert first_health == 503  # the worker was still loading the model
    assert client.get("/health").status_code == 200


def test_served_probabilities_are_predicts_for_the_same_file(served, tiny_checkpoint, tiny_data_dir, tmp_path):
    client, _ = served
    photo = tmp_path / "shoe.png"
    Image.fromarray(dark_shoe_on_white()).save(photo)
    out = tmp_path / "predictions.csv"
    run_main(
        "predict", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(tiny_checkpoint), "--data.predict_paths",
        f"[{photo}]", "--trainer.precision", "32-true", "--predictions.output", str(out), "--predictions.top_k", "10",
        cwd=tmp_path,
    )  # fmt: skip
    with open(out, newline="") as file:
        (row,) = list(csv.DictReader(file))
    expected = {row[f"top{k}_class"]: float(row[f"top{k}_probability"]) for k in range(1, 11)}

    for response in (
        predict_file(client, "shoe.png", photo.read_bytes()),
        client.post("/predict", content=photo.read_bytes(), headers={"Content-Type": "image/png"}),  # raw body
    ):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["predicted_class"] == row["predicted_class"]
        assert answer["predicted_index"] == int(row["predicted_index"])
        assert [entry["class"] for entry in answer["top_k"]] == [row[f"top{k}_class"] for k in range(1, 11)]
        for entry in answer["top_k"]:
            assert entry["probability"] == pytest.approx(expected[entry["class"]], abs=1e-5)
            assert CLASS_NAMES[entry["index"]] == entry["class"]
        assert sum(entry["probability"] for entry in answer["top_k"]) == pytest.approx(1, abs=1e-5)
    assert predict_file(client, "shoe.png", photo.read_bytes()).json()["file"] == "shoe.png"


def truncated_png() -> bytes:
    return png_bytes(dark_shoe_on_white())[:60]


def form_without_file(client, tmp):
    return client.post("/predict", files={"image": ("x.png", png_bytes(dark_shoe_on_white()), "image/png")})


@pytest.mark.parametrize(
    ("send", "status", "message"),
    [
        (lambda c, _: predict_file(c, "notes.png", b"not a picture"), 400, "not an image Pillow can read"),
        (lambda c, _: predict_file(c, "cut.png", truncated_png()), 400, "unreadable image"),
        (lambda c, _: predict_file(c, "empty.png", b""), 400, "the file is empty (0 bytes)"),
        (lambda c, _: c.post("/predict", content=b"", headers={"Content-Type": "image/png"}), 400, "empty"),
        (lambda c, _: c.post("/predict", json={"image": "abc"}), 415, "Content-Type application/json is not an image"),
        (lambda c, _: c.post("/predict", content=b"\x89PNG"), 415, "no Content-Type is not an image upload"),
        (lambda c, _: c.post("/predict", data={"file": "hello"}), 415, "application/x-www-form-urlencoded"),
        (lambda c, _: c.post("/predict", files={"file": (None, "hello")}), 400, "holds text, not a file"),
        (form_without_file, 400, "no image in the request (form fields: 'image')"),
        (lambda c, _: predict_file(c, "big.png", bytes(MAX_BODY + 1)), 413, f"limit of {MAX_BODY:,} bytes"),
        (
            lambda c, _: c.post("/predict", content=bytes(MAX_BODY + 1), headers={"Content-Type": "image/png"}),
            413,
            "--max_body_mb",
        ),
        (
            lambda c, tmp: predict_file(c, "huge.png", declared_size_png(tmp / "h.png", 9000, 9000).read_bytes()),
            413,
            "over the 64 megapixel limit",
        ),
        (lambda c, _: c.post("/predict", files=[("file", ("x.png", b"\x89", "image/png"))] * 257), 413, "limit of 256"),
        (
            lambda c, _: c.post("/predict", files={"file": ("a.png", b"x")}, data={"invert": "maybe"}),
            400,
            "invert must",
        ),
        (lambda c, _: c.get("/predict"), 405, "method not allowed"),
        (lambda c, _: c.get("/nowhere"), 404, "no such route"),
    ],
)
def test_bad_input_is_a_4xx_json_answer_and_the_server_keeps_serving(served, tmp_path, send, status, message):
    client, _ = served
    response = send(client, tmp_path)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.get("/health").status_code == 200
    assert predict_file(client, "ok.png", png_bytes(dark_shoe_on_white())).status_code == 200


def test_one_bad_image_fails_alone_in_a_request_and_in_a_batch(served):
    client, _ = served
    good = png_bytes(dark_shoe_on_white())
    files = [("file", ("a.png", good, "image/png")), ("file", ("b.png", b"junk", "image/png")),
             ("file", ("c.png", good, "image/png"))]  # fmt: skip
    answer = client.post("/predict", files=files)
    assert answer.status_code == 200
    first, second, third = answer.json()["predictions"]
    assert second == {"file": "b.png", "error": "not an image Pillow can read"}
    assert first["predicted_class"] == third["predicted_class"] and first["file"] == "a.png"

    uploads = [good if index % 4 else b"junk" for index in range(16)]  # concurrent requests share batches
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda data: predict_file(client, "x.png", data), uploads))
    assert [response.status_code for response in responses] == [200 if index % 4 else 400 for index in range(16)]
    assert {response.json()["predicted_class"] for response in responses if response.status_code == 200} == {
        first["predicted_class"]
    }
    values = metric_values(client.get("/metrics").text)
    batches, images = values["fmnist_inference_batch_images_count"], values["fmnist_inference_batch_images_sum"]
    assert images / batches > 1  # dynamic batching put requests together


def test_every_route_but_health_needs_the_key(served):
    client, _ = served
    stranger = TestClient(client.app)
    for method, path in (("post", "/predict"), ("get", "/info"), ("get", "/metrics"), ("get", "/")):
        response = getattr(stranger, method)(path)
        assert response.status_code == 401
        assert "no API key: send the server's key in the X-API-Key header" in response.json()["error"]
    wrong = stranger.get("/info", headers={"X-API-Key": "x" * 24})
    assert wrong.status_code == 401 and "wrong API key" in wrong.json()["error"]
    assert stranger.get("/health").status_code == 200


def test_info_describes_the_checkpoint_and_metrics_count_requests(served, tiny_checkpoint):
    client, _ = served
    model = client.get("/info").json()["model"]
    assert model["parameters"] == 93_322
    assert model["class_names"] == list(CLASS_NAMES)
    assert model["temperature"] == 1.0
    assert model["model_file"] == str(tiny_checkpoint)
    assert model["recipe"].startswith("original network, Adam")
    assert model["limits"]["max_body_bytes"] == MAX_BODY and model["api_key_required"] is True
    predict_file(client, "ok.png", png_bytes(dark_shoe_on_white()))
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert 'fmnist_http_requests_total{route="/predict",status="200"}' in response.text
    assert 'fmnist_http_request_seconds_bucket{le="0.001",route="/predict"}' in response.text
    assert 'fmnist_images_total{outcome="decoded"}' in response.text


@pytest.fixture(scope="module")
def onnx_file(tiny_checkpoint, tiny_data_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[export]')")
    from fmnist_lightning.commands.export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, "onnx", tmp_path_factory.mktemp("onnx") / "model.onnx",
                             data_dir=tiny_data_dir)[0]  # fmt: skip


def test_an_onnx_export_serves_the_same_probabilities_without_batching(served, onnx_file, metrics_folder):
    from fmnist_lightning.serving.info import onnx_info
    from fmnist_lightning.serving.server import ServeSettings

    upload = png_bytes(dark_shoe_on_white())
    expected = predict_file(served[0], "shoe.png", upload).json()
    settings = ServeSettings(model_file=onnx_file, info=onnx_info(onnx_file), top_k=10, max_batch_size=1)
    with serving(settings) as (client, _):
        answer = predict_file(client, "shoe.png", upload).json()
        assert client.get("/info").json()["model"]["format"] == "onnx"
    assert answer["predicted_class"] == expected["predicted_class"]
    for mine, theirs in zip(answer["top_k"], expected["top_k"], strict=True):
        assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-5)


def test_a_request_that_waits_past_the_timeout_gets_504(onnx_file, metrics_folder):
    from fmnist_lightning.serving.info import onnx_info
    from fmnist_lightning.serving.server import ServeSettings

    settings = ServeSettings(model_file=onnx_file, info=onnx_info(onnx_file), timeout=1e-9, batch_timeout=0)
    with serving(settings) as (client, _):
        response = predict_file(client, "shoe.png", png_bytes(dark_shoe_on_white()))
        assert response.status_code == 504
        assert response.json() == {
            "error": "the request waited longer than the server's timeout of 1e-09 s (--timeout)"
        }
        assert client.get("/health").status_code == 200


def refusal_cases():
    def foreign(tmp):
        torch = pytest.importorskip("torch")
        torch.save({"weights": torch.zeros(3)}, tmp / "other.ckpt")
        return ["--ckpt_path", str(tmp / "other.ckpt")]

    def text_onnx(tmp):
        (tmp / "model.onnx").write_text("not a model")
        return ["--ckpt_path", str(tmp / "model.onnx")]

    def busy_port(tmp):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        BUSY.append(listener)  # kept open for the test's duration
        return ["--port", str(listener.getsockname()[1])]

    return [
        (lambda tmp: ["--ckpt_path", str(tmp / "missing.ckpt")], "missing.ckpt"),
        (foreign, "is not a Lightning checkpoint (no 'state_dict')"),
        (text_onnx, "is not an ONNX model onnxruntime can load"),
        (lambda tmp: ["--ckpt_path", str(tmp / "gone.onnx")], "no such file"),
        (busy_port, "Address already in use; choose another --port"),
        (lambda tmp: ["--port", "80"], "--port must be between 1024 and 65535, got 80"),
        (lambda tmp: ["--host", "0.0.0.0"], "--host 0.0.0.0 lets other machines in: give --api_key KEY"),
        (lambda tmp: ["--host", "::", "--api_key", "short"], "at least 16 printable ASCII characters, got 5"),
        (lambda tmp: ["--host", "192.0.2.1", "--api_key", KEY], "LitServe serves on 127.0.0.1, 0.0.0.0, :: only"),
        (lambda tmp: ["--host", "not a host"], "is not an address to serve on"),
        (lambda tmp: ["--max_batch_size", "0"], "--max_batch_size must be at least 1, got 0"),
        (lambda tmp: ["--workers", "0"], "--workers must be at least 1"),
        (lambda tmp: ["--top_k", "11"], "--top_k must be between 1 and 10, got 11"),
        (lambda tmp: ["--timeout", "0"], "--timeout must be a finite number above 0"),
        (lambda tmp: ["--max_body_mb", "-1"], "--max_body_mb must be a finite number above 0, got -1"),
        (lambda tmp: ["--batch_timeout", "-1"], "--batch_timeout must be a finite number at least 0"),
        (lambda tmp: ["--batch_timeout", "5", "--timeout", "2"], "--batch_timeout 5 must be shorter than --timeout 2"),
        (lambda tmp: ["--port", "x"], "Parser key \"port\": Expected a <class 'int'>. Got value: x"),
    ]


BUSY: list[socket.socket] = []


@pytest.mark.parametrize(("make_args", "message"), refusal_cases())
def test_the_server_command_refuses_before_serving(tiny_checkpoint, tmp_path, make_args, message):
    args = ["--ckpt_path", str(tiny_checkpoint), *make_args(tmp_path)]  # a later --ckpt_path wins
    before = tree_snapshot(tmp_path)
    result = run_main("serve", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert tree_snapshot(tmp_path) == before


def descendants(pid: int) -> set[int]:
    """Every process started under `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="counts the server's processes in /proc")
def test_the_server_as_a_process_answers_a_burst_and_stops_cleanly_on_sigterm(tiny_checkpoint, tmp_path):
    httpx = pytest.importorskip("httpx")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = tree_snapshot(tmp_path)
    server = start_cli("serve", "--ckpt_path", str(tiny_checkpoint), "--port", str(port), cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert server.poll() is None, server.stdout.read()
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=180, what="fmnist serve to load the model")
        upload = png_bytes(dark_shoe_on_white())
        single = httpx.post(f"{url}/predict", files={"file": ("shoe.png", upload, "image/png")}).json()
        assert single["predicted_class"] in CLASS_NAMES

        async def burst() -> list:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                good = [
                    client.post("/predict", content=upload, headers={"Content-Type": "image/png"}) for _ in range(32)
                ]
                bad = [client.post("/predict", content=b"junk", headers={"Content-Type": "image/jpeg"}),
                       client.post("/predict", json={"image": 1})]  # fmt: skip
                return await asyncio.gather(*good, *bad)

        responses = asyncio.run(burst())
        assert [response.status_code for response in responses] == [200] * 32 + [400, 415]
        assert {response.json()["predicted_class"] for response in responses[:32]} == {single["predicted_class"]}
        assert httpx.get(f"{url}/health").status_code == 200
        counted = metric_values(httpx.get(f"{url}/metrics").text)  # from the HTTP and the inference processes
        assert counted['fmnist_http_requests_total{route="/predict",status="200"}'] == 33
        assert counted['fmnist_images_total{outcome="decoded"}'] == 33
        workers = descendants(server.pid)
        assert len(workers) >= 3  # an HTTP server, an inference worker, LitServe's queue manager
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=90)[0]
    assert server.returncode == 0, output
    assert "Traceback" not in output
    assert f"serving:          {url}/predict" in output
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=30, what="workers to stop")
    assert tree_snapshot(tmp_path) == before  # no client.py, no metrics files


def test_a_port_whose_last_connections_are_still_closing_is_free():
    from fmnist_lightning.commands.addresses import ensure_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the side that closes first keeps the port in TIME_WAIT
    client.close()
    ensure_port_free("127.0.0.1", port)  # a server restarted at once binds there (uvicorn and Gradio do)
