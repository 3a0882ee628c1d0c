"""`python -m src.serve`: a real uvicorn on a loopback port serving the micro student's ONNX export."""

from __future__ import annotations

import base64
import contextlib
import gc
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from src.core import manifest
from src.core.config import ServeConfig
from src.flows import Decision, StageFailed, promote
from src.serving.app import create_app
from src.serving.service import Service, load_model

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle at the top on a blue background"


@contextlib.contextmanager
def running(service: Service):
    """Serve `service` with uvicorn on 127.0.0.1 (a free port) in a thread; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def served(folder: Path, **cfg) -> Service:
    service = Service(ServeConfig(**cfg), provider="cpu")
    service.install(load_model(folder, "fp32", "cpu", 0))
    return service


def metric(text: str, name: str) -> float:
    """The value of one sample line of Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def infer_png(folder: Path, tmp: Path, prompt: str, seed: int) -> bytes:
    out = tmp / f"infer-{seed}.png"
    run = subprocess.run([sys.executable, "-m", "src.infer", prompt, "--seed", str(seed), "--model", str(folder),
                          "--out", str(out), "--provider", "cpu"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    return out.read_bytes()


def test_an_image_is_the_infer_cli_image_byte_for_byte_whatever_shares_its_batch(micro_onnx, tmp_path):
    folder, _ = micro_onnx
    version = manifest.read(folder)["version"]
    expected = infer_png(folder, tmp_path, PROMPT, 5)
    others = [{"prompt": f"a small white plus sign in the center, seed {s}", "seed": s} for s in range(6)]
    with running(served(folder, max_batch=16, max_delay_ms=400, max_n=4)) as url, httpx.Client(base_url=url) as c:
        alone = c.post("/v1/images", json={"prompt": PROMPT, "seed": 5})
        bodies = others[:3] + [{"prompt": PROMPT, "seed": 5}] + others[3:] + \
            [{"prompt": PROMPT, "seed": 4, "n": 3, "response_format": "b64_json"}]
        with ThreadPoolExecutor(len(bodies)) as pool:                 # all inside one batching window
            responses = list(pool.map(lambda b: c.post("/v1/images", json=b, timeout=60), bodies))
        text = c.get("/metrics").text
    assert alone.status_code == 200 and alone.headers["content-type"] == "image/png"
    assert alone.content == expected
    assert alone.headers["x-model-version"] == version and alone.headers["x-seed"] == "5"
    assert all(r.status_code == 200 for r in responses)
    assert responses[3].content == expected                          # batched with 9 other images
    many = responses[-1].json()
    assert [i["seed"] for i in many["images"]] == [4, 5, 6] and many["model_version"] == version
    assert base64.b64decode(many["images"][1]["b64_png"]) == expected
    batches = metric(text, "swiftbrush_batch_images_count")
    assert batches < 1 + len(bodies) and metric(text, "swiftbrush_images_total") == 1 + len(others) + 1 + 3
    assert metric(text, 'swiftbrush_batch_images_bucket{le="1.0"}') <= 1       # only the lone request ran alone


def test_without_batching_each_request_is_its_own_call(micro_onnx):
    folder, _ = micro_onnx
    with running(served(folder, batching=False, max_delay_ms=400)) as url, httpx.Client(base_url=url) as c:
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda s: c.post("/v1/images", json={"prompt": PROMPT, "seed": s}).status_code,
                                  range(4)))
        text = c.get("/metrics").text
    assert codes == [200] * 4
    assert metric(text, "swiftbrush_batch_images_count") == 4 == metric(text, 'swiftbrush_batch_images_bucket{le="1.0"}')


BAD = [  # (body, status, words the error must contain)
    (b'{"seed": 1}', 422, "prompt: Field required"),
    (b'{"prompt": "   "}', 422, "prompt: must not be empty"),
    (b'{"prompt": ""}', 422, "prompt: must not be empty"),
    (b'{"prompt": 42}', 422, "prompt: Input should be a valid string"),
    (b'{"prompt": null}', 422, "prompt: Input should be a valid string"),
    (b'{"prompt": "a cat", "seed": -1}', 422, "seed: Input should be greater than or equal to 0"),
    (b'{"prompt": "a cat", "seed": 1.5}', 422, "seed: Input should be a valid integer"),
    (b'{"prompt": "a cat", "seed": "3"}', 422, "seed: Input should be a valid integer"),
    (b'{"prompt": "a cat", "seed": true}', 422, "seed: Input should be a valid integer"),
    (b'{"prompt": "a cat", "seed": NaN}', 422, "seed: Input should be a valid integer"),
    (b'{"prompt": "a cat", "seed": 99999999999999999999999}', 422, "seed: Input should be less than or equal to"),
    (b'{"prompt": "a cat", "seed": 9223372036854775807, "n": 2, "response_format": "b64_json"}', 422,
     "seed + n - 1"),
    (b'{"prompt": "a cat", "n": 0}', 422, "n: Input should be greater than or equal to 1"),
    (b'{"prompt": "a cat", "n": 5, "response_format": "b64_json"}', 422, "n: at most 4 images"),
    (b'{"prompt": "a cat", "n": "2"}', 422, "n: Input should be a valid integer"),
    (b'{"prompt": "a cat", "n": 2}', 422, "response_format 'png' returns one image"),
    (b'{"prompt": "a cat", "response_format": "jpeg"}', 422, "response_format: Input should be 'png' or 'b64_json'"),
    (b'{"prompt": "a cat", "size": 512}', 422, "size: unknown field"),
    (b'{"prompt": "a cat",', 400, "not valid JSON"),
    (b'', 400, "not valid JSON"),
    (b'\xff\xfe{}', 400, "not valid JSON"),
    (b'[1, 2]', 422, "expected a JSON object"),
    (b'"a cat"', 422, "expected a JSON object"),
    (b'[' * 5000 + b']' * 5000, 400, "nests too deeply"),
    (b'{"prompt": "' + b'a' * 2001 + b'"}', 422, "prompt: 2001 characters, at most 2000"),
    (b'{"prompt": "\\ud800 cat"}', 422, "lone UTF-16 surrogate"),
    (b'{"prompt": "\\u0000\\u0007 "}', 422, "only whitespace and 2 control characters"),
    (b'{"prompt": "' + b'a' * 20000 + b'"}', 413, "at most 16384"),
]


@pytest.fixture(scope="module")
def server(micro_onnx):
    with running(served(micro_onnx[0], max_n=4)) as url:
        yield url


@pytest.mark.parametrize("body, status, words", BAD, ids=[f"{i:02d}" for i in range(len(BAD))])
def test_every_bad_request_gets_a_4xx_json_error_saying_what_was_wrong(server, body, status, words):
    r = httpx.post(server + "/v1/images", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_bad_requests_never_reach_a_500_and_are_counted_by_kind(server):
    assert httpx.get(server + "/v1/images").status_code == 405
    assert httpx.get(server + "/nope").status_code == 404
    streamed = httpx.post(server + "/v1/images", content=iter([b'{"prompt": "', b"a" * 17000, b'"}']))
    assert streamed.status_code == 413                                # no Content-Length: counted as it streams
    text = httpx.get(server + "/metrics").text
    assert metric(text, 'swiftbrush_errors_total{kind="internal"}') == 0
    assert metric(text, 'swiftbrush_errors_total{kind="invalid_request"}') > 0
    assert 'code="500"' not in text


def test_a_long_prompt_is_served_with_the_truncation_warning(server):
    r = httpx.post(server + "/v1/images", json={"prompt": " ".join(["red circle"] * 80), "seed": 1,
                                                "response_format": "b64_json"})
    assert r.status_code == 200
    assert "truncated" in r.json()["warnings"][0]
    png = httpx.post(server + "/v1/images", json={"prompt": " ".join(["red circle"] * 80), "seed": 1})
    assert "truncated" in png.headers["x-warning"]
    assert png.content == base64.b64decode(r.json()["images"][0]["b64_png"])


def test_control_characters_are_removed_with_a_warning(server):
    clean = httpx.post(server + "/v1/images", json={"prompt": PROMPT, "seed": 2})
    dirty = httpx.post(server + "/v1/images", json={"prompt": "\x00" + PROMPT.replace(" ", " \x1b", 1), "seed": 2,
                                                    "response_format": "b64_json"})
    assert dirty.status_code == 200 and "2 control character(s) removed" in dirty.json()["warnings"][0]
    assert base64.b64decode(dirty.json()["images"][0]["b64_png"]) == clean.content


def test_a_full_queue_answers_429_with_retry_after_and_a_slow_one_503(micro_onnx):
    folder, _ = micro_onnx
    with running(served(folder, max_queue=2, max_n=2, max_batch=4, max_delay_ms=800)) as url:
        with ThreadPoolExecutor(3) as pool:              # 2 images wait out the 800 ms window; the third is refused
            first = pool.submit(httpx.post, url + "/v1/images",
                                json={"prompt": "a cat", "n": 2, "response_format": "b64_json"}, timeout=30)
            time.sleep(0.2)
            refused = httpx.post(url + "/v1/images", json={"prompt": "a cat"})
            assert first.result().status_code == 200
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "retry in" in refused.json()["error"]["message"]
    with running(served(folder, max_delay_ms=1000, request_timeout_s=0.1)) as url:
        slow = httpx.post(url + "/v1/images", json={"prompt": "a cat"})
        assert slow.status_code == 503 and "request_timeout_s" in slow.json()["error"]["message"]


def _promote(folder: Path, production: Path, tmp: Path) -> None:
    """What src.flows does after a winning evaluation: copy the workspace's models/onnx into production."""
    ws = tmp / f"ws-{time.monotonic_ns()}"
    (ws / "models").mkdir(parents=True)
    shutil.copytree(folder, ws / "models" / "onnx")
    promote(ws, production, {}, Decision(True, "test", "m", 1.0, None))


def test_promotions_swap_in_under_load_without_a_failed_request(micro_onnx, micro_onnx_b, tmp_path):
    a, b = micro_onnx[0], micro_onnx_b
    va, vb = manifest.read(a)["version"], manifest.read(b)["version"]
    assert va != vb
    production = tmp_path / "production"
    service = Service(ServeConfig(watch_interval_s=0.05, max_delay_ms=2), provider="cpu")
    service.production = production
    with running(service) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503                   # nothing promoted yet
        assert c.post("/v1/images", json={"prompt": "a cat"}).status_code == 503
        _promote(a, production, tmp_path)
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/readyz").json()["model_version"] == va

        seen: dict[int, list[tuple[int, str, bytes]]] = {k: [] for k in range(3)}
        stop = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as own:
                while not stop.is_set():
                    r = own.post("/v1/images", json={"prompt": PROMPT, "seed": 3})
                    seen[k].append((r.status_code, r.headers.get("x-model-version", ""), r.content))

        threads = [threading.Thread(target=client, args=(k,)) for k in seen]
        for t in threads:
            t.start()
        time.sleep(0.5)
        old = weakref.ref(service.model)
        _promote(b, production, tmp_path)                            # the winner of the next retraining
        deadline = time.monotonic() + 30
        while not any(v == vb for k in seen for _, v, _ in seen[k][-3:]):
            assert time.monotonic() < deadline, "the promoted model was never served"
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        text = c.get("/metrics").text
        gc.collect()
        assert old() is None                                         # A's session is released once drained

        # A damaged promotion (a copy cut short) is refused; the current model serves on.
        broken = tmp_path / "broken"
        shutil.copytree(a, broken)
        graph = broken / "fp32" / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:1000])
        with pytest.raises(StageFailed, match="model.onnx"):
            _promote(broken, production, tmp_path)                   # src.flows checks before it swaps
        from src.core.fileio import atomic_dir

        with atomic_dir(production / "current") as tmp:              # ... and a hand-made one reaches the server
            shutil.copytree(broken, tmp / "onnx")
        deadline = time.monotonic() + 30
        while metric(c.get("/metrics").text, 'swiftbrush_model_swaps_total{result="refused"}') < 1:
            assert time.monotonic() < deadline, "the damaged promotion was never looked at"
            time.sleep(0.05)
        after = c.post("/v1/images", json={"prompt": PROMPT, "seed": 3})
        assert after.status_code == 200 and after.headers["x-model-version"] == vb
        assert c.get("/readyz").json()["model_version"] == vb

    for k, rows in seen.items():
        assert rows and all(code == 200 for code, _, _ in rows), f"client {k}: a request failed"
        versions = [v for _, v, _ in rows]
        changes = sum(1 for x, y in zip(versions, versions[1:]) if x != y)
        assert versions[0] == va and versions[-1] == vb and changes == 1, versions
    images = {v: png for rows in seen.values() for _, v, png in rows}
    assert images[va] != images[vb]                                  # the new model really draws the images
    assert metric(text, 'swiftbrush_model_swaps_total{result="ok"}') == 1
    assert f'swiftbrush_model_info{{precision="fp32",provider="CPUExecutionProvider",version="{vb}"}} 1.0' in text


def test_the_page_and_the_command_line(server, micro_onnx, tmp_path):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "v1/images" in page.text and 'id="prompt"' in page.text
    broken = tmp_path / "onnx"
    shutil.copytree(micro_onnx[0], broken)
    (broken / "onestep.json").write_text("{}")
    run = subprocess.run([sys.executable, "-m", "src.serve", "--model", str(broken), "--port", "1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert str(broken / "onestep.json") in run.stderr
    bad = subprocess.run([sys.executable, "-m", "src.serve", "--set", "serve.max_n=99", "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and "max_n (99) must not exceed max_batch (16)" in bad.stderr
