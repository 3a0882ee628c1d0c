"""The OpenAI Images API dialect: POST /v1/images/generations, GET /v1/models, and the `url` images.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")   # any key when keys are off
    image = client.images.generate(prompt="a red circle", size="64x64", response_format="b64_json")

Request fields: `prompt` (required), `n`, `size` ("WxH": only the artifact's own size; another is a 400
naming it), `response_format` ("b64_json", or "url": a link to the image held in memory for
serve.url_ttl_s seconds, at most serve.url_images of them; the default when offered, as in OpenAI's API),
`model` and `user` (any string: one model is served), `quality` and `style` (accepted, no effect on a
one-step student), and `seed`, which OpenAI's API does not have: the image is a function of (model,
prompt, seed) as on every route, and a random seed is drawn when none is given. Response:
`{created, data: [{b64_json | url, revised_prompt}]}` with `revised_prompt` the prompt as drawn
(normalised). Errors are `{error: {message, type, param, code}}` with OpenAI's status codes.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import OrderedDict
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from .generate import draw, image_size, serving_model
from .requests import MAX_SEED, Rejected, check_count, check_prompt, json_object, read_body, validation_message

FIELDS = "prompt, n, size, response_format, model, user, quality, style, seed"


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    n: StrictInt | None = Field(1, ge=1)
    size: StrictStr | None = None
    response_format: Literal["url", "b64_json"] | None = None
    model: StrictStr | None = None
    user: StrictStr | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)


class ImageStore:
    """PNG bytes behind unguessable tokens, for at most `ttl_s` seconds; the oldest go first past `capacity`."""

    def __init__(self, capacity: int, ttl_s: float):
        self.capacity, self.ttl_s = capacity, ttl_s
        self.items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def put(self, png: bytes) -> str:
        self.expire()
        token = secrets.token_urlsafe(24)
        self.items[token] = (time.monotonic() + self.ttl_s, png)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return token

    def get(self, token: str) -> bytes | None:
        self.expire()
        item = self.items.get(token)
        return item[1] if item else None

    def expire(self) -> None:
        now = time.monotonic()
        while self.items and next(iter(self.items.values()))[0] <= now:
            self.items.popitem(last=False)


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_exceeded"}


def error_response(err: Rejected) -> JSONResponse:
    """OpenAI's error shape; its 400 where our routes answer 422."""
    status = 400 if err.status == 422 else err.status
    code = "invalid_api_key" if err.status == 401 else err.kind
    body = {"error": {"message": err.message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": err.param, "code": code}}
    return JSONResponse(body, status, err.headers)


def parse(body: bytes) -> GenerationRequest:
    try:
        return GenerationRequest.model_validate(json_object(body))
    except ValidationError as err:
        message, param = validation_message(err, FIELDS)
        raise Rejected(400, "invalid_request", message, param=param) from None


def check_size(size: str | None, width: int, height: int) -> None:
    if size is not None and size != f"{width}x{height}":
        raise Rejected(400, "invalid_size", f"size: this model draws {width}x{height} images only (got {size!r}); "
                                            f"ask for size '{width}x{height}' or leave it out", param="size")


def model_entry(service) -> dict:
    art = service.model
    created = int(art.folder.stat().st_mtime) if art is not None and art.folder is not None else 0
    return {"id": service.cfg.model_name, "object": "model", "created": created, "owned_by": "swiftbrush"}


def add_routes(app, service, authorize) -> None:
    store = ImageStore(service.cfg.url_images, service.cfg.url_ttl_s) if service.cfg.url_images else None

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        authorize(request)
        req = parse(await read_body(request, service.cfg.max_body_bytes))
        art = serving_model(service)
        check_size(req.size, *image_size(art))
        fmt = req.response_format or ("url" if store is not None else "b64_json")
        if fmt == "url" and store is None:
            raise Rejected(400, "unsupported_response_format", "response_format: 'url' is not offered by this "
                           "server (serve.url_images is 0); ask for 'b64_json'", param="response_format")
        prompt, warnings = check_prompt(req.prompt, service.cfg)
        check_count(req.n, req.seed, service.cfg)
        drawn = await draw(service, prompt, req.n, req.seed, warnings)
        if fmt == "url":
            base = str(request.base_url)
            data = [{"url": f"{base}v1/images/files/{store.put(p)}.png", "revised_prompt": drawn.prompt}
                    for p in drawn.pngs]
        else:
            data = [{"b64_json": base64.b64encode(p).decode(), "revised_prompt": drawn.prompt} for p in drawn.pngs]
        return JSONResponse({"created": int(time.time()), "data": data}, headers=drawn.headers)

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str):
        png = store.get(name.removesuffix(".png")) if store is not None and name.endswith(".png") else None
        if png is None:
            raise Rejected(404, "not_found", f"no image {name!r} here: image links expire after "
                                             f"{service.cfg.url_ttl_s:g} s")
        return Response(png, media_type="image/png")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_entry(service)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != service.cfg.model_name:
            raise Rejected(404, "model_not_found", f"model {model_id!r} is not served here; the one model is "
                                                   f"{service.cfg.model_name!r}", param="model")
        return model_entry(service)
