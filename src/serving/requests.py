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

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}
        self.param = param                  # the request field at fault, where one is (OpenAI's error shape)


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    n: StrictInt = Field(1, ge=1)
    response_format: Literal["png", "b64_json"] = "png"


def parse_request(body: bytes, cfg: ServeConfig) -> tuple[ImageRequest, list[str]]:
    """The request body -> (a checked request with its prompt normalised, warnings); every problem is a 4xx
    naming the field."""
    raw = json_object(body)
    try:
        req = ImageRequest.model_validate(raw)
    except ValidationError as err:
        message, _ = validation_message(err, "prompt, seed, n, response_format")
        raise Rejected(422, "invalid_request", message) from None
    prompt, warnings = check_prompt(req.prompt, cfg)
    check_count(req.n, req.seed, cfg)
    if req.response_format == "png" and req.n != 1:
        raise Rejected(422, "invalid_request", "response_format 'png' returns one image: ask for n = 1, "
                                               "or use response_format 'b64_json'")
    req.prompt = prompt
    return req, warnings


def json_object(body: bytes) -> dict:
    """The body as a JSON object; 400 for what is not JSON, 422 for JSON that is not an object."""
    try:
        raw = json.loads(body)
    except RecursionError:
        raise Rejected(400, "invalid_json", "the body nests too deeply to be a request") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Rejected(400, "invalid_json", f"the body is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise Rejected(422, "invalid_request", f"expected a JSON object like {{\"prompt\": \"...\"}}, "
                                               f"got {type(raw).__name__}")
    return raw


def validation_message(err: ValidationError, allowed: str) -> tuple[str, str | None]:
    """pydantic's errors as one line naming each field, and the first field at fault."""
    parts, first = [], None
    for e in err.errors():
        key = ".".join(map(str, e["loc"])) or "body"
        first = first or key
        got = f" (got {json.dumps(e['input'])[:60]})" if e["type"] not in ("missing", "extra_forbidden") else ""
        msg = f"unknown field; allowed: {allowed}" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{key}: {msg}{got}")
    return "; ".join(parts), first


def check_prompt(prompt: str, cfg: ServeConfig, param: str = "prompt") -> tuple[str, list[str]]:
    """The prompt normalised as prepare and infer normalise it, and warnings; a 422 naming `param` for an
    empty, too long or invalid one."""
    if len(prompt) > cfg.max_prompt_chars:
        raise Rejected(422, "invalid_request", f"{param}: {len(prompt)} characters, at most {cfg.max_prompt_chars}",
                       param=param)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(422, "invalid_request", f"{param}: contains a lone UTF-16 surrogate (not valid Unicode text)",
                       param=param) from None
    text, removed = normalize_counted(prompt)
    if not text:
        raise Rejected(422, "invalid_request", f"{param}: must not be empty" + (
            f" (it held only whitespace and {removed} control characters)" if removed else ""), param=param)
    return text, [f"{removed} control character(s) removed from the prompt"] if removed else []


def check_count(n: int, seed: int | None, cfg: ServeConfig, param: str = "n") -> None:
    if n > cfg.max_n:
        raise Rejected(422, "invalid_request", f"{param}: at most {cfg.max_n} images per request (got {n})",
                       param=param)
    if seed is not None and seed + n - 1 > MAX_SEED:
        raise Rejected(422, "invalid_request", f"seed: seed + {param} - 1 must be at most {MAX_SEED}", param="seed")


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
