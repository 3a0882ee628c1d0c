"""The AUTOMATIC1111 web UI API dialect: POST /sdapi/v1/txt2img and what front-ends read around it.

    import webuiapi
    api = webuiapi.WebUIApi(host="127.0.0.1", port=8000)
    result = api.txt2img(prompt="a red circle", seed=0, width=64, height=64)   # the artifact's size

txt2img draws `batch_size` x `n_iter` images from seeds seed, seed + 1, ... (`seed` -1: a random one),
exactly the images the other routes draw for that prompt and seed. `width` and `height` must be the
artifact's (left out, they default to it). What a one-step student cannot honour is refused by name:
a `negative_prompt` (it has no negative branch: it was distilled with guidance baked in), hires fix,
face restoration, tiling, styles, variation seeds and scripts. `steps`, `cfg_scale`, the sampler and
scheduler (one network evaluation, guidance baked in) and fields this server does not know are accepted
and listed under `ignored` in `info`, which is a JSON string as the web UI returns it (seed, all_seeds,
width, height, infotexts, ...). Errors are `{error, detail, body, errors}`, the web UI's shape.
GET /sdapi/v1/sd-models lists the one model; GET/POST /sdapi/v1/options read and set
`sd_model_checkpoint` (only to the served model); GET /sdapi/v1/samplers and /schedulers list the one
"sampler".
"""

from __future__ import annotations

import base64
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from .generate import draw, image_size, serving_model
from .requests import MAX_SEED, Rejected, check_count, check_prompt, json_object, read_body, validation_message

SAMPLER = "one-step"
IGNORED = ("steps", "cfg_scale", "sampler_name", "sampler_index", "scheduler")


class Txt2ImgRequest(BaseModel):
    """The fields of the web UI's txt2img that this server reads; others are kept and reported as ignored."""

    model_config = ConfigDict(extra="allow")
    prompt: StrictStr = ""
    negative_prompt: StrictStr | None = ""
    seed: StrictInt = Field(-1, ge=-1, le=MAX_SEED)
    batch_size: StrictInt = Field(1, ge=1)
    n_iter: StrictInt = Field(1, ge=1)
    width: StrictInt | None = None
    height: StrictInt | None = None
    steps: StrictInt | None = None
    cfg_scale: float | None = None
    sampler_name: StrictStr | None = None
    sampler_index: StrictStr | None = None
    scheduler: StrictStr | None = None
    enable_hr: StrictBool = False
    restore_faces: StrictBool | None = False
    tiling: StrictBool | None = False
    styles: list[StrictStr] | None = None
    subseed_strength: float = 0.0
    script_name: StrictStr | None = None
    send_images: StrictBool = True


def error_response(err: Rejected) -> JSONResponse:
    return JSONResponse({"error": err.kind, "detail": err.message, "body": "", "errors": err.message},
                        err.status, err.headers)


def refusals(req: Txt2ImgRequest, width: int, height: int) -> list[str]:
    """What the request asks that a one-step student cannot do, one sentence per field."""
    out = []
    if req.negative_prompt:
        out.append("negative_prompt: a one-step student has no negative branch (classifier-free guidance was "
                   "distilled into it); leave it empty")
    for name, asked in (("enable_hr", req.enable_hr), ("restore_faces", req.restore_faces),
                        ("tiling", req.tiling)):
        if asked:
            out.append(f"{name}: not offered by a one-step student; set it false")
    if req.styles:
        out.append("styles: saved prompt styles are not offered; put the text in the prompt")
    if req.subseed_strength:
        out.append("subseed_strength: variation seeds are not offered; set it 0")
    if req.script_name:
        out.append(f"script_name: scripts are not offered (got {req.script_name!r})")
    for name, got, want in (("width", req.width, width), ("height", req.height, height)):
        if got is not None and got != want:
            out.append(f"{name}: this model draws {width}x{height} images only (got {got})")
    return out


def ignored(req: Txt2ImgRequest) -> dict:
    """The fields accepted without effect: the sampling settings a one-step student has no use for, and
    fields this server does not know (webuiapi sends the web UI's whole form)."""
    out = {k: getattr(req, k) for k in IGNORED if getattr(req, k) is not None}
    return out | {"unknown_fields": sorted(req.model_extra)} if req.model_extra else out


def title(service) -> tuple[str, str]:
    """(title, short hash) of the served model as the web UI names checkpoints: 'name [hash]'."""
    art = serving_model(service)
    short = art.version[:10]
    return f"{service.cfg.model_name} [{short}]", short


def infotext(prompt: str, seed: int, width: int, height: int, name: str, short: str) -> str:
    return (f"{prompt}\nSteps: 1, Sampler: {SAMPLER}, CFG scale: 1, Seed: {seed}, Size: {width}x{height}, "
            f"Model hash: {short}, Model: {name}")


def add_routes(app, service, authorize) -> None:
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        authorize(request, basic=True)
        try:
            req = Txt2ImgRequest.model_validate(json_object(await read_body(request, service.cfg.max_body_bytes)))
        except ValidationError as err:
            message, param = validation_message(err, "")
            raise Rejected(422, "invalid_request", message, param=param) from None
        width, height = image_size(serving_model(service))
        problems = refusals(req, width, height)
        if problems:
            raise Rejected(422, "unsupported", "; ".join(problems))
        prompt, warnings = check_prompt(req.prompt, service.cfg)
        n = req.batch_size * req.n_iter
        check_count(n, None if req.seed < 0 else req.seed, service.cfg, param="batch_size x n_iter")
        drawn = await draw(service, prompt, n, None if req.seed < 0 else req.seed, warnings)
        name, short = title(service)
        info = {"prompt": drawn.prompt, "all_prompts": [drawn.prompt] * n, "negative_prompt": "",
                "all_negative_prompts": [""] * n, "seed": drawn.seeds[0], "all_seeds": drawn.seeds,
                "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": width, "height": height,
                "sampler_name": SAMPLER, "cfg_scale": 1, "steps": 1, "batch_size": req.batch_size,
                "restore_faces": False, "sd_model_name": service.cfg.model_name, "sd_model_hash": short,
                "model_version": drawn.art.version, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "infotexts": [infotext(drawn.prompt, s, width, height, service.cfg.model_name, short)
                              for s in drawn.seeds],
                "ignored": ignored(req), "warnings": drawn.warnings, "index_of_first_image": 0}
        parameters = req.model_dump(exclude_none=False)
        images = [base64.b64encode(p).decode() for p in drawn.pngs] if req.send_images else []
        return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(info)},
                            headers=drawn.headers)

    @app.get("/sdapi/v1/sd-models")
    async def sd_models(request: Request):
        authorize(request, basic=True)
        name, short = title(service)
        art = service.model
        return [{"title": name, "model_name": service.cfg.model_name, "hash": short, "sha256": art.version,
                 "filename": str(art.folder), "config": None}]

    @app.get("/sdapi/v1/options")
    async def get_options(request: Request):
        authorize(request, basic=True)
        name, short = title(service)
        return {"sd_model_checkpoint": name, "sd_checkpoint_hash": short, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        authorize(request, basic=True)
        body = json_object(await read_body(request, service.cfg.max_body_bytes))
        name, short = title(service)
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None and wanted not in (name, service.cfg.model_name, short):
            raise Rejected(422, "invalid_request", f"sd_model_checkpoint: {wanted!r} is not served here; the one "
                                                   f"model is {name!r}", param="sd_model_checkpoint")
        return None                      # the web UI answers null; other options have no effect here

    @app.get("/sdapi/v1/samplers")
    async def samplers(request: Request):
        authorize(request, basic=True)
        return [{"name": SAMPLER, "aliases": [], "options": {}}]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers(request: Request):
        authorize(request, basic=True)
        return [{"name": SAMPLER, "label": "One step", "aliases": None, "default_rho": -1, "need_inner_model": False}]
