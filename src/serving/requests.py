"""Parsing POST /v1/images: one clear 4xx per bad body (`Rejected`), warnings for what was normalised."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from ..core.config import ServeConfig
from ..core.text import normalize_counted

MAX_SEED = 2**63 - 1


class Rejected(Exception):
    """A request answered with an error: HTTP status, a kind (the `errors_total` label) and a message."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    n: StrictInt = Field(1, ge=1)
    response_format: Literal["png", "b64_json"] = "png"


def parse_request(body: bytes, cfg: ServeConfig) -> tuple[ImageRequest, list[str]]:
    """The request body -> (a checked request with its prompt normalised, warnings); every problem is a 4xx
    naming the field."""
    try:
        raw = json.loads(body)
    except RecursionError:
        raise Rejected(400, "invalid_json", "the body nests too deeply to be a request") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Rejected(400, "invalid_json", f"the body is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise Rejected(422, "invalid_request", f"expected a JSON object like {{\"prompt\": \"...\"}}, "
                                               f"got {type(raw).__name__}")
    try:
        req = ImageRequest.model_validate(raw)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = ".".join(map(str, e["loc"])) or "body"
            got = f" (got {json.dumps(e['input'])[:60]})" if e["type"] not in ("missing", "extra_forbidden") else ""
            msg = "unknown field; allowed: prompt, seed, n, response_format" if e["type"] == "extra_forbidden" \
                else e["msg"]
            parts.append(f"{key}: {msg}{got}")
        raise Rejected(422, "invalid_request", "; ".join(parts)) from None
    if len(req.prompt) > cfg.max_prompt_chars:
        raise Rejected(422, "invalid_request", f"prompt: {len(req.prompt)} characters, at most {cfg.max_prompt_chars}")
    try:
        req.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(422, "invalid_request", "prompt: contains a lone UTF-16 surrogate (not valid Unicode text)") \
            from None
    prompt, removed = normalize_counted(req.prompt)          # as prepare and infer do
    if not prompt:
        raise Rejected(422, "invalid_request", "prompt: must not be empty" + (
            f" (it held only whitespace and {removed} control characters)" if removed else ""))
    if req.n > cfg.max_n:
        raise Rejected(422, "invalid_request", f"n: at most {cfg.max_n} images per request (got {req.n})")
    if req.seed is not None and req.seed + req.n - 1 > MAX_SEED:
        raise Rejected(422, "invalid_request", f"seed: seed + n - 1 must be at most {MAX_SEED}")
    if req.response_format == "png" and req.n != 1:
        raise Rejected(422, "invalid_request", "response_format 'png' returns one image: ask for n = 1, "
                                               "or use response_format 'b64_json'")
    req.prompt = prompt
    warnings = [f"{removed} control character(s) removed from the prompt"] if removed else []
    return req, warnings


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "body_too_large", f"the body is {declared} bytes, at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, "body_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
