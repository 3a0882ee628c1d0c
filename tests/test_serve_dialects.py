"""The OpenAI and AUTOMATIC1111 dialects and API keys, each driven by a client someone else wrote (the
official `openai` package, `webuiapi`), against a real uvicorn on a loopback port."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from src.core.errors import UserError
from src.serving.auth import ENV, check_bind, load_keys, match
from test_serve import PROMPT, REPO, metric, running, served

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")


def native(url: str, prompt: str, seed: int, n: int, headers: dict | None = None) -> list[bytes]:
    """The PNGs POST /v1/images gives for (prompt, seed, n)."""
    r = httpx.post(url + "/v1/images", json={"prompt": prompt, "seed": seed, "n": n, "response_format": "b64_json"},
                   headers=headers or {}, timeout=60)
    assert r.status_code == 200, r.text
    return [base64.b64decode(i["b64_png"]) for i in r.json()["images"]]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def server(micro_onnx):
    service = served(micro_onnx[0], max_n=4, url_images=2, url_ttl_s=2.0)
    with running(service) as url:
        h, w = service.model.image_hw
        yield url, f"{w}x{h}", (w, h)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="no-key-needed", max_retries=0)


def test_openai_client_draws_the_images_of_v1_images_for_the_same_seed(server, client):
    url, size, _ = server
    got = client.images.generate(prompt="  " + PROMPT, n=2, size=size, response_format="b64_json",
                                 extra_body={"seed": 7})
    assert [base64.b64decode(d.b64_json) for d in got.data] == native(url, PROMPT, 7, 2)
    assert all(d.revised_prompt == PROMPT for d in got.data)       # the prompt as drawn: normalised
    assert abs(got.created - time.time()) < 60


def test_openai_url_images_download_once_stored_and_expire(server, client):
    url, size, _ = server
    got = client.images.generate(prompt=PROMPT, size=size, extra_body={"seed": 3})   # url: OpenAI's default
    link = got.data[0].url
    assert link.startswith(url + "/v1/images/files/")
    assert httpx.get(link).content == native(url, PROMPT, 3, 1)[0]
    time.sleep(2.2)                                                   # serve.url_ttl_s
    gone = httpx.get(link)
    assert gone.status_code == 404 and "expire" in gone.json()["error"]["message"]
    links = [client.images.generate(prompt=PROMPT, size=size, response_format="url").data[0].url for _ in range(3)]
    assert httpx.get(links[0]).status_code == 404                     # serve.url_images = 2: the oldest went
    assert httpx.get(links[2]).status_code == 200


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(size="1024x1024"), "size", "draws {size} images only"),
    (dict(n=9), "n", "at most 4 images"),
    (dict(prompt=" \t "), "prompt", "must not be empty"),
    (dict(extra_body={"negative": "x"}), "negative", "unknown field"),
    (dict(response_format="png"), "response_format", "url"),
])
def test_openai_bad_requests_are_400s_in_openais_error_shape(server, client, kwargs, param, words):
    args = {"prompt": PROMPT} | kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(**args)
    assert err.value.status_code == 400 and err.value.param == param, err.value.body
    assert words.format(size=server[1]) in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error"


def test_openai_models_list_the_served_model(client, micro_onnx):
    models = client.models.list()
    assert [m.id for m in models.data] == ["swiftbrush-onestep"]
    assert client.models.retrieve("swiftbrush-onestep").owned_by == "swiftbrush"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


def test_url_images_can_be_switched_off(micro_onnx):
    service = served(micro_onnx[0], url_images=0)
    with running(service) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            c.images.generate(prompt=PROMPT, response_format="url")
        assert "not offered" in err.value.body["message"]
        assert c.images.generate(prompt=PROMPT).data[0].b64_json      # the default is then b64_json


def test_webuiapi_txt2img_draws_the_same_images_and_reports_what_it_ignored(server):
    url, _, (w, h) = server
    api = webuiapi.WebUIApi(baseurl=url + "/sdapi/v1")
    result = api.txt2img(prompt=PROMPT, seed=11, batch_size=2, width=w, height=h)     # steps 20, cfg 7 by default
    want = [pixels(p) for p in native(url, PROMPT, 11, 2)]
    assert len(result.images) == 2
    for img, ref in zip(result.images, want):
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), ref)
    info = result.info
    assert info["all_seeds"] == [11, 12] and (info["width"], info["height"]) == (w, h)
    assert info["ignored"]["steps"] == 20 and info["ignored"]["cfg_scale"] == 7.0
    assert "eta" in info["ignored"]["unknown_fields"]               # webuiapi sends the web UI's whole form
    assert info["infotexts"][1].startswith(PROMPT + "\nSteps: 1") and "Seed: 12" in info["infotexts"][1]


def test_webuiapi_random_seed_is_reported_truthfully(server):
    url, _, (w, h) = server
    result = webuiapi.WebUIApi(baseurl=url + "/sdapi/v1").txt2img(prompt=PROMPT, seed=-1, width=w, height=h)
    seed = result.info["seed"]
    assert seed >= 0
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), pixels(native(url, PROMPT, seed, 1)[0]))


@pytest.mark.parametrize("kwargs, words", [
    (dict(negative_prompt="blurry"), "negative_prompt: a one-step student has no negative branch"),
    (dict(width=512), "width: this model draws"),
    (dict(enable_hr=True), "enable_hr: not offered"),
    (dict(batch_size=3, n_iter=2), "batch_size x n_iter: at most 4"),
])
def test_webuiapi_what_a_one_step_student_cannot_do_is_refused_by_name(server, kwargs, words):
    url, _, (w, h) = server
    args = {"prompt": PROMPT, "width": w, "height": h} | kwargs
    with pytest.raises(RuntimeError) as err:
        webuiapi.WebUIApi(baseurl=url + "/sdapi/v1").txt2img(**args)
    status, text = err.value.args
    assert status == 422
    body = json.loads(text)
    assert words in body["detail"] and set(body) == {"error", "detail", "body", "errors"}


def test_webuiapi_models_and_options(server):
    api = webuiapi.WebUIApi(baseurl=server[0] + "/sdapi/v1")
    models = api.get_sd_models()
    assert len(models) == 1 and models[0]["model_name"] == "swiftbrush-onestep"
    title = models[0]["title"]
    assert api.util_get_model_names() == [title]
    assert api.get_options()["sd_model_checkpoint"] == title
    assert api.set_options({"sd_model_checkpoint": title}) is None
    r = httpx.post(server[0] + "/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned.safetensors"})
    assert r.status_code == 422 and title in r.json()["detail"]


# --------------------------------------------------------------------------- API keys


@pytest.fixture(scope="module")
def keyed(micro_onnx, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    hashed = hashlib.sha256(b"team-b-secret").hexdigest()
    keys.write_text(f"# serving keys\nteam-a-secret\n\nsha256:{hashed}\n")
    service = served(micro_onnx[0], api_keys_file=str(keys))
    service.key_hashes = load_keys(service.cfg.api_keys_file, environ={})
    with running(service) as url:
        yield url, service


def test_every_dialect_needs_a_key_and_answers_401_in_its_own_shape(keyed):
    url, _ = keyed
    r = httpx.post(url + "/v1/images", json={"prompt": PROMPT})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "unauthorized"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="team-a-secreT", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.images.generate(prompt=PROMPT, response_format="b64_json")
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(RuntimeError) as err:
        webuiapi.WebUIApi(baseurl=url + "/sdapi/v1").txt2img(prompt=PROMPT)
    assert err.value.args[0] == 401 and json.loads(err.value.args[1])["error"] == "unauthorized"
    assert httpx.get(url + "/healthz").status_code == 200 and httpx.get(url + "/readyz").status_code == 200


def test_valid_keys_draw_and_are_counted_by_key_id_never_by_key(keyed):
    url, _ = keyed
    ids = {k: hashlib.sha256(k.encode()).hexdigest()[:8] for k in ("team-a-secret", "team-b-secret")}
    before = httpx.get(url + "/metrics").text
    a = native(url, PROMPT, 1, 1, {"Authorization": "Bearer team-a-secret"})
    good = openai.OpenAI(base_url=url + "/v1", api_key="team-b-secret", max_retries=0)   # listed by its SHA-256
    b = good.images.generate(prompt=PROMPT, response_format="b64_json", extra_body={"seed": 1})
    assert base64.b64decode(b.data[0].b64_json) == a[0]
    api = webuiapi.WebUIApi(baseurl=url + "/sdapi/v1")
    api.set_auth("anyone", "team-a-secret")                          # the web UI's HTTP Basic, key as password
    assert api.txt2img(prompt=PROMPT, seed=1, width=None, height=None).info["seed"] == 1
    after = httpx.get(url + "/metrics").text
    name = 'swiftbrush_authorized_requests_total{key_id="%s"}'
    assert metric(after, name % ids["team-a-secret"]) - metric(before, name % ids["team-a-secret"]) == 2
    assert metric(after, name % ids["team-b-secret"]) - metric(before, name % ids["team-b-secret"]) == 1
    assert "team-a-secret" not in after and "team-b-secret" not in after


def test_the_page_asks_for_a_key(keyed):
    page = httpx.get(keyed[0] + "/").text
    assert 'id="key"' in page and "r.status === 401" in page


def test_keys_files_and_the_environment_are_read_strictly(tmp_path):
    f = tmp_path / "k.txt"
    f.write_text("alpha\nsha256:" + "A" * 64 + "\n")
    hashes = load_keys(str(f), environ={ENV: "beta, gamma"})
    assert hashes == [hashlib.sha256(b"alpha").hexdigest(), "a" * 64] + \
        [hashlib.sha256(k.encode()).hexdigest() for k in ("beta", "gamma")]
    assert match("alpha", hashes) == hashes[0] and match("alph", hashes) is None and match("", hashes) is None
    assert load_keys(None, environ={}) == []
    for text, words in (("# only a comment\n", "holds no key"), ("sha256:abc\n", "line 1: 'sha256:'"),
                        ("two words\n", "must not contain whitespace")):
        f.write_text(text)
        with pytest.raises(UserError, match=words):
            load_keys(str(f), environ={})
    with pytest.raises(UserError, match="cannot read"):
        load_keys(str(tmp_path / "missing.txt"), environ={})


def test_no_key_means_loopback_only_unless_the_user_says_so(micro_onnx):
    check_bind("127.0.0.1", False, False)
    check_bind("0.0.0.0", True, False)
    check_bind("0.0.0.0", False, True)
    with pytest.raises(UserError, match="--allow-unauthenticated"):
        check_bind("0.0.0.0", False, False)
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "src.serve", "--model", str(micro_onnx[0]), "--host", "0.0.0.0"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "no API key" in run.stderr and "Traceback" not in run.stderr
