"""The try-on service on Ray Serve: a FastAPI ingress in front of a batched model deployment.

    serve run serve/config.yaml                      # local: tiny base + the trained LoRA
    ray start --head && serve deploy serve/config.yaml   # onto a running Ray cluster

Routes: ``POST /v1/tryon`` (multipart; a JPEG, WebP or PNG, or JSON with it in base64),
``GET /v1/info``, ``GET /healthz``, ``GET /`` (the try-on page) with its examples (``GET /v1/examples``,
``/examples/{id}.png``: :mod:`serve.gallery`), ``GET /docs`` and ``/openapi.json``.

Two deployments, so that each scales on its own: ``TryOnIngress`` (checks the key, the body size
and every field, decodes each image once, pastes the try-on back onto the upload and encodes the
answer: the pixel work of a 12 MP photo, no model) and ``TryOnModel`` (base + LoRA + parser
loaded once per replica; requests that arrive while a batch runs go together,
:class:`catvton.infer.batching.Batcher`). Between the two travel arrays at the resolution the
model needs, never the upload's 12 MP nor re-encoded images. GPUs: a model that runs on CUDA
(``device: cuda``, or ``auto`` with a GPU preset) gets ``num_gpus: 1`` on its deployment here
(:func:`application`), and a replica that Ray gave no GPU refuses to put it on CUDA
(:func:`catvton.infer.serving.serve_device`): Ray 2.60 no longer hides a node's GPUs from an actor
that reserved none. ``serve/config.l40s.yaml`` is the production file. Overload: the ingress holds
at most ``max_queued_requests`` of the model's requests waiting; beyond that Serve raises
``BackPressureError`` at once and the client gets 503 with ``Retry-After`` instead of a queue
that grows without bound. Everything that decides a picture is library code
(:mod:`catvton.infer.serving`), the same as evaluation's.

The module is long because it is the one place the HTTP API meets Ray Serve: the FastAPI routes
and their errors (testable without Ray through ``create_api``), the two deployments, and the
application builder that reserves the model's GPU; splitting it would split one request's path.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from catvton.infer.batching import Batcher
from catvton.infer.registry import MODEL_ID
from catvton.infer.outfit import OutfitRequest, Piece
from catvton.infer.request import FORMATS, InputError
from catvton.config import ConfigError
from catvton.infer.serving import (GPU_FIX, ServeConfig, TryOnService, model_config, pick_lora, repo_path,
                                   serve_config_from_dict, wants_gpu)
from catvton.offline import resolve
from serve.experiments import parse_experiments
from serve.gallery import PREFIX as EXAMPLES_PREFIX, mount as mount_examples
from serve import metrics
from serve.keys import route_path
from serve.openapi import document_errors, form_bodies_without_null
from serve.traffic import Traffic
from serve.uploads import PieceUpload, answer, decode_request

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).with_name("page.html")
OPEN_PATHS = ("/healthz",)
"""Routes that never need the key: the load balancer's probe."""
PAGE_PATHS = ("/", "/favicon.ico", "/v1/examples")
"""The page's static HTML holds no data and calls the API with the key typed into it, so it
stays reachable when a key is set (a browser cannot add a header to a page load); so do its
example pictures (public synthetic renders, :mod:`serve.gallery`), under ``EXAMPLES_PREFIX`` too."""

ROUTE_ERRORS: dict[tuple[str, str], dict[int, str]] = {
    ("POST", "/v1/tryon"): {
        404: "No such model, one this key may not use, or no such experiment (`field` names it)",
        422: "Matches the schema but cannot be served: not an image, a mask of another size or empty, no "
             "garment, no parser for a missing mask (`field` names it)",
        503: "Overloaded: retry after `Retry-After` seconds"},
    ("POST", "/v1/feedback"): {
        404: "No such request id (an answer's `X-Request-Id`), or this server keeps no event log",
        422: "A choice between one request and itself, or a preferred id that is neither compared one"},
    ("GET", "/v1/usage"): {404: "This server has no customer keys"},
}
"""The refusals of each operation beside those every one can give (401, 429, and 400 / 413 for a
body): published in /openapi.json with their :data:`serve.openapi.ERROR` body."""
FEEDBACK = {
    "type": "object", "required": ["request_id"],
    "properties": {
        "request_id": {"type": "string", "description": "`X-Request-Id` of the answer judged"},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5, "description": "A 1-5 rating of that answer"},
        "other_request_id": {"type": "string", "description": "A choice: the answer it was compared with"},
        "preferred_request_id": {"type": "string", "description": "A choice: the one the user preferred"},
        "user_id": {"type": "string", "description": "Who chose (the `x-tryon-user` of the requests)"}},
    "oneOf": [{"required": ["rating"]}, {"required": ["other_request_id", "preferred_request_id"]}],
}
"""``POST /v1/feedback``'s JSON body, as published (the route reads it itself, to name what is wrong)."""


class Backend(Protocol):
    """What the ingress needs from the model side (a DeploymentHandle wrapper in Serve)."""

    async def tryon(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def info(self) -> dict[str, Any]: ...

    async def models(self) -> dict[str, Any]: ...


class Overloaded(Exception):
    def __init__(self, retry_after_s: float | None):
        self.retry_after_s = retry_after_s


def error(status: int, field: str | None, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "field": field, **extra}, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------
# Pure ASGI middlewares: they run before FastAPI reads anything.


class BodyLimit:
    """413 for a body over the limit: at once from Content-Length, or while reading a chunked body
    (which is then buffered, at most the limit, and replayed)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        too_big = error(413, "body", f"request body over {self.max_bytes:,} bytes: send smaller images")
        if b"content-length" in headers:
            try:
                length = int(headers[b"content-length"])
            except ValueError:
                return await error(400, "content-length", "Content-Length is not a number")(scope, receive, send)
            if length > self.max_bytes:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        body, done = b"".join(chunks), False

        async def replay():
            nonlocal done
            if done:
                return await receive()
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class BearerAuth:
    """401 unless ``Authorization: Bearer <key>`` matches (constant-time compare)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if path in OPEN_PATHS + PAGE_PATHS or path.startswith(EXAMPLES_PREFIX):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            resp = error(401, "authorization", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------
# The FastAPI application (no Ray in here: a test can drive it with any Backend).


def create_api(settings: ServeConfig, backend: Backend) -> FastAPI:
    app = FastAPI(
        title="CatVTON-Flux try-on",
        version="1.0",
        description="Dress a person in a garment (upper, lower or full body). "
                    "Every error is JSON with `error` and the `field` to fix.",
    )
    max_bytes = int(settings.max_body_mb * 1024 * 1024)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    traffic = Traffic(settings)  # customer keys, experiments, the event log (serve/traffic.py)
    key = settings.resolved_api_key()
    customer_keys = traffic.guard(app, OPEN_PATHS + PAGE_PATHS, (EXAMPLES_PREFIX,))
    if key and not customer_keys:
        app.add_middleware(BearerAuth, key=key)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        loc = [str(x) for x in (errors[0].get("loc", ()) if errors else ())]
        field = loc[1] if len(loc) > 1 and loc[0] in ("body", "query", "header") else (loc[0] if loc else "body")
        details = [{"field": ".".join(str(x) for x in e.get("loc", ())[1:]) or "body", "error": e.get("msg", "")}
                   for e in errors]
        # 400: the request does not match the published schema (a client to fix); 422 is kept for
        # requests that match it but cannot be served (a photo that is no image, a mask of another size)
        return error(400, field, f"{field}: {errors[0].get('msg', 'invalid')}" if errors else "invalid request",
                     details=details)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, "body" if exc.status_code == 400 else None, str(exc.detail),
                     headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        # never a stack trace to the client; the replica keeps serving
        log.exception("try-on request failed")
        return error(500, None, "internal error (logged on the server)")

    @app.get("/healthz", summary="Liveness probe (never needs the key)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", summary="The loaded base, LoRA, its metrics and the request limits")
    async def info() -> dict:
        out = await backend.info()
        out["limits"] = {"max_body_mb": settings.max_body_mb, "max_image_side": settings.max_image_side,
                         "max_image_pixels": settings.max_image_pixels, "min_image_side": settings.min_image_side,
                         "max_half_pixels": settings.max_half_pixels, "max_steps": settings.max_steps}
        out["auth"] = bool(key)
        out["formats"] = list(FORMATS)
        out["default_format"] = "the person upload's: jpeg for a JPEG, webp for a WebP, png for any other"
        return out

    @app.get("/v1/models", summary="The models this server offers (x-tryon-model), with their evaluation figures")
    async def models(request: Request) -> dict:
        return traffic.visible(request, await backend.models())

    @app.post("/v1/feedback", summary="A user's choice between two answers (request ids), or a 1-5 rating of one",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": FEEDBACK}}}})
    async def feedback(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            body = None
        try:
            return traffic.feedback(body)
        except InputError as e:
            return error(e.status, e.field, e.message)

    @app.get("/v1/usage", summary="The calling key's request counts (with customer keys)")
    async def usage(request: Request) -> dict:
        key_state = request.scope.get("state", {}).get("api_key")
        if key_state is None:
            return error(404, None, "this server has no customer keys (args.keys_file)")
        return {"key": key_state["name"], **traffic.usage.snapshot().get(key_state["name"], {})}

    canvas: dict[str, Any] = {}

    async def model_canvas() -> dict[str, Any]:
        """The model's canvas (half size, person fit), asked once: it sets how far uploads are reduced."""
        if not canvas:
            canvas.update((await backend.info())["canvas"])
        return canvas

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    mount_examples(app)  # GET /v1/examples and /examples/{name}.png: the page's gallery
    form_bodies_without_null(app)  # /openapi.json: what a multipart client can send (no null fields)

    def errors_of(path: str, method: str) -> dict[int, str]:
        """The refusals an operation can answer with, as this server is configured."""
        out: dict[int, str] = {}
        guarded = path not in OPEN_PATHS + PAGE_PATHS
        if guarded and (key or customer_keys):
            out[401] = "Missing or wrong API key: send `Authorization: Bearer <key>`"
        if guarded and customer_keys:
            out[429] = "Over this key's rate: retry after `Retry-After` seconds"
        if method == "POST":
            out[400] = "The request does not match this schema (`details` names each field)"
            out[413] = "Body or image too large (`field` names it)"
        return out | ROUTE_ERRORS.get((method, path), {})

    document_errors(app, errors_of)  # /openapi.json: every status a client can get, with its body

    @app.post(
        "/v1/tryon",
        summary="Dress a person in a garment, or in an outfit (a top and a bottom, or a full garment)",
        description="One garment: `garment` + `garment_type`. An outfit: `upper` and/or `lower`, or `full`, each "
                    "with its optional `<region>_mask`. Passes run top first, then bottom (`/v1/info` "
                    "`outfit_order`); outside the union of the general masks every pixel is the upload's. A "
                    "garment photo is a product shot, or a photo of someone wearing it: then send its "
                    "`..._garment_mask` (or `..._worn=true` where the server has a parser) and it is cut out as "
                    "training cuts it.",
        response_class=Response,
        responses={
            200: {"content": {**{t: {} for t in FORMATS.values()}, "application/json": {}},
                  "description": "The person wearing the garment(s), at the person photo's size"},
        },  # the refusals: ROUTE_ERRORS and errors_of
    )
    async def tryon(
        request: Request,
        person: UploadFile = File(..., description="Photo of the person (PNG/JPEG/WebP)"),
        garment: UploadFile | None = File(None, description="One garment: its photo (a product shot, or a worn "
                                                             "photo with `garment_mask`)"),
        garment_type: Literal["upper", "lower", "full"] | None = Form(None, description="Region of `garment`"),
        mask: UploadFile | None = File(None, description="Worn-garment mask for `garment`, the person photo's size "
                                                         "(white = garment); generalised like in training. "
                                                         "Left out: made by the server's parser, if it has one"),
        garment_mask: UploadFile | None = File(None, description="`garment` is a worn photo: the garment on it "
                                                                 "(white), the garment photo's size"),
        garment_worn: bool = Form(False, description="`garment` is a worn photo; the parser finds the garment"),
        upper: UploadFile | None = File(None, description="Outfit: the top's photo"),
        upper_mask: UploadFile | None = File(None, description="The person's top region (white); else the parser"),
        upper_garment_mask: UploadFile | None = File(None, description="`upper` is a worn photo: the top on it"),
        upper_worn: bool = Form(False, description="`upper` is a worn photo; the parser finds the top"),
        lower: UploadFile | None = File(None, description="Outfit: the bottom's photo"),
        lower_mask: UploadFile | None = File(None, description="The person's bottom region (white); else the parser"),
        lower_garment_mask: UploadFile | None = File(None, description="`lower` is a worn photo: the bottom on it"),
        lower_worn: bool = Form(False, description="`lower` is a worn photo; the parser finds the bottom"),
        full: UploadFile | None = File(None, description="Outfit: a full-body garment (worn alone)"),
        full_mask: UploadFile | None = File(None, description="The person's full-body region (white); else the parser"),
        full_garment_mask: UploadFile | None = File(None, description="`full` is a worn photo: the garment on it"),
        full_worn: bool = Form(False, description="`full` is a worn photo; the parser finds the garment"),
        model: str | None = Form(None, max_length=64, description="Model id (`GET /v1/models`) on a server with "
                                 "a registry; or the `x-tryon-model` header. Left out: the server's default"),
        steps: int | None = Form(None, ge=1, le=1000, description="Denoising steps (default from the model config)"),
        guidance: float | None = Form(None, ge=0.0, le=100.0, description="Guidance"),
        seed: int | None = Form(None, ge=0, le=2**32 - 1, description="Noise seed (pass k of an outfit: seed + k)"),
        size: str | None = Form(None, max_length=16, description="Canvas half WIDTHxHEIGHT, multiples of 16"),
        image_format: Literal["jpeg", "webp", "png"] | None = Form(
            None, alias="format", description="Answer format; default: the person upload's (a JPEG for a "
                                              "JPEG, a PNG for a PNG). png: lossless, slow at 12 MP"),
        output: Literal["image", "json", "png"] = Form("image", description="image: the picture itself; json: "
                                                       "base64 + metadata; png: the same as image with format=png"),
    ) -> Response:
        start = time.perf_counter()
        named = model or request.headers.get("x-tryon-model")
        chosen: tuple[str | None, str | None, str | None] = (named, None, None)  # model, experiment, user

        def refused(status: int, field: str | None, message: str, headers: dict | None = None) -> JSONResponse:
            # a model the request got wrong is "unknown" on the metrics: labels from any string a
            # client sends would grow without bound (and Ray's tags are ASCII)
            label = chosen[0] if field != "model" and chosen[0] and MODEL_ID.match(chosen[0]) else \
                ("unknown" if chosen[0] else None)
            metrics.request_done(label, status, reason=field or ("overloaded" if status == 503 else None))
            request_id, echo = traffic.request_id(request)
            traffic.record(request_id, *chosen, status, time.perf_counter() - start, error=message)
            return error(status, field, message, headers={**(headers or {}), **({"X-Request-Id": request_id} if echo else {})})

        if output == "png" and image_format not in (None, "png"):
            return refused(422, "format", f"output=png asks for a PNG but format={image_format}: send output=image")
        try:
            chosen = traffic.choose(request, named)
            uploads = [PieceUpload("garment", garment, garment_type, mask, garment_mask, garment_worn, True),
                       PieceUpload("upper", upper, "upper", upper_mask, upper_garment_mask, upper_worn),
                       PieceUpload("lower", lower, "lower", lower_mask, lower_garment_mask, lower_worn),
                       PieceUpload("full", full, "full", full_mask, full_garment_mask, full_worn)]
            decoded = await run_in_threadpool(decode_request, settings, await model_canvas(), person, uploads, steps,
                                              guidance, seed, size)
            sent = time.perf_counter()
            if chosen[0]:
                decoded.payload["model"] = chosen[0]
            # a phone photo is turned upright at full size while the model runs
            turned = None if decoded.person.upright_ready else asyncio.ensure_future(
                run_in_threadpool(lambda: decoded.person.full))
            result = await backend.tryon(decoded.payload)
            if turned is not None:
                await turned
        except InputError as e:
            return refused(e.status, e.field, e.message)
        except Overloaded as e:
            retry = str(int(np.ceil(e.retry_after_s if e.retry_after_s is not None else settings.retry_after_s)))
            return refused(503, None, "the model's queue is full: retry later", headers={"Retry-After": retry})
        if "error" in result:
            return refused(result["status"], result["error"]["field"], result["error"]["error"])
        back = time.perf_counter()
        fmt = image_format or ("png" if output == "png" else decoded.person.format)
        body, spans = await run_in_threadpool(answer, decoded, result, fmt)
        # where the time went (ms), for browsers' dev tools and bench/big_photo.py: decode, the model
        # replica's prepare and model (the pipeline call of the request's batch), paste and encode
        spans = {"decode": sent - decoded.started, "prepare": result["prepare_s"], "model": result["model_s"],
                 "call": back - sent, **spans, "total": time.perf_counter() - start}
        meta = {"seed": result["seed"], "steps": result["steps"], "guidance": result["guidance"],
                "mask_source": result["mask_source"], "garment_type": ",".join(result["regions"]),
                "regions": ",".join(result["regions"]), **({"model": result["model"]} if result.get("model") else {})}
        width, height = decoded.person.size
        answered = result.get("model") or chosen[0]
        metrics.request_done(answered, 200, spans)
        request_id, echo = traffic.request_id(request)
        traffic.record(request_id, answered, chosen[1], chosen[2], 200, spans["total"])
        id_header = {"X-Request-Id": request_id} if echo else {}  # else the proxy's, the same id
        if chosen[1]:
            meta["experiment"] = chosen[1]
        if output == "json":
            # image_png_base64 for a PNG, as before `format` existed; image_jpeg_base64 ... otherwise
            return JSONResponse({f"image_{fmt}_base64": base64.b64encode(body).decode(), "media_type": FORMATS[fmt],
                                 "width": width, "height": height, **meta, "regions": result["regions"],
                                 "request_id": request_id}, headers=id_header)
        headers = {f"X-Tryon-{k.replace('_', '-').title()}": str(v) for k, v in meta.items()} | id_header
        headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in spans.items())
        return Response(body, media_type=FORMATS[fmt], headers=headers)

    return app


# --------------------------------------------------------------------------------------------
# Ray Serve deployments.


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=8,
    max_queued_requests=16,
    backpressure_config=BackpressureConfig(retry_after_s=2),
)
class TryOnModel:
    """Base + LoRA (+ parser) loaded once; requests that arrive while a batch runs go together
    (one pipeline call per size and step count)."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = serve_config_from_dict(settings)
        # offline names (tiny, tiny-alpha) become cached folders; hub ids and folders pass through
        self.service = TryOnService.load(self.settings, prepare=resolve)
        self.batcher = Batcher(self.generate, self.settings.max_batch_size, self.settings.batch_wait_timeout_s)
        if self.service.registry is not None:
            service = self.service

            async def load_adapter(model_id: str) -> _LoadedAdapter:
                await asyncio.to_thread(service.adapters.load, service.release(model_id))
                metrics.adapter_loaded(model_id)
                return _LoadedAdapter(service, model_id)

            # Serve's multiplexing: routes a model's requests to the replicas that hold it, and
            # unloads the least recently used beyond max_adapters (_LoadedAdapter.__del__)
            self.adapter = serve.multiplexed(max_num_models_per_replica=self.settings.max_adapters)(load_adapter)

    async def tryon(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload``: the ingress's arrays at the working size (the person and one piece per
        garment); answers :meth:`catvton.infer.serving.Dressing.reply` plus ``prepare_s`` and
        ``model_s`` (the pipeline calls of the batches this request's passes were in)."""
        t0 = time.perf_counter()
        prepare_s = model_s = 0.0
        model = None
        try:
            if self.service.registry is None and payload.get("model"):
                own = self.models()["default"]
                if payload["model"] != own:  # never another model's name answered by this one's weights
                    raise InputError("model", f"this server serves one model, {own!r}: name it or leave "
                                     "the model out", status=404)
            if self.service.registry is not None:
                model = self.service.release(payload.get("model") or serve.get_multiplexed_model_id() or None).model_id
                try:
                    await self.adapter(model)
                except Exception as e:  # a release that broke after the scan: this request fails, the replica serves on
                    log.exception("loading model %s failed", model)
                    raise InputError("model", f"model {model!r} could not be loaded: {type(e).__name__}: {e}",
                                     status=503) from e
            request = OutfitRequest(payload["person"], [Piece(**piece) for piece in payload["pieces"]],
                                    payload["seed"], payload["steps"], payload["guidance"], payload["half_hw"])
            dressing = await asyncio.to_thread(self.service.start, request)
            while True:  # one pass per garment, each through the batcher with other requests' passes
                t1 = time.perf_counter()
                job = await asyncio.to_thread(dressing.next_job)
                prepare_s += time.perf_counter() - t1
                if job is None:
                    break
                job.model = model
                result, seconds = await self.batcher.submit(job)
                model_s += seconds
                dressing.done(job, result)
        except InputError as e:
            return {"error": e.to_dict(), "status": e.status}
        return {**dressing.reply(), "prepare_s": prepare_s, "model_s": model_s, "replica_s": time.perf_counter() - t0,
                "model": model}

    async def generate(self, jobs: list) -> list[tuple[np.ndarray, float]]:
        """One batch: canvases and the seconds the pipeline took for all of them."""
        metrics.queue_length(self.batcher.pending)
        t0 = time.perf_counter()
        # in a thread: the replica's event loop keeps taking requests (the next batch) meanwhile
        results = await asyncio.to_thread(self.service.generate, jobs)
        seconds = time.perf_counter() - t0
        return [(r, seconds) for r in results]

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the registry's models, or the one model of a single-LoRA server."""
        if self.service.registry is not None:
            return self.service.models()
        lora = self.service.lora
        return {"models": [{"id": lora.name if lora else "base", "metrics": self.service.info()["metrics"],
                            "evaluation": None}], "default": lora.name if lora else "base", "refused": {}}

    def info(self) -> dict[str, Any]:
        out = self.service.info()
        sizes = self.batcher.sizes
        out["max_batch_size"] = self.settings.max_batch_size
        out["recent_batch_sizes"] = {str(k): sizes.count(k) for k in sorted(set(sizes))}
        return out


class _LoadedAdapter:
    """What Serve's multiplexing keeps per loaded model; Serve calls ``__del__`` when it unloads
    the least recently used one, which removes the adapter from the replica's pipeline."""

    def __init__(self, service: TryOnService, model_id: str):
        self.service, self.model_id, self.unloaded = service, model_id, False

    def __del__(self):
        # once: Serve calls it on eviction and the garbage collector again later, by which time the
        # model may be loaded anew under a new handle
        if not self.unloaded and self.service.adapters is not None:
            self.unloaded = True
            if self.service.adapters.unload(self.model_id):  # False when already gone (AdapterSet evicts too)
                metrics.adapter_evicted(self.model_id)


class _HandleBackend:
    def __init__(self, handle):
        self.handle = handle

    async def tryon(self, payload: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        # a named model goes where it is loaded (Serve's multiplexed routing)
        handle = self.handle.options(multiplexed_model_id=payload["model"]) if payload.get("model") else self.handle
        try:
            return await handle.tryon.remote(payload)
        except BackPressureError as e:
            raise Overloaded(e.retry_after_s) from e

    async def models(self) -> dict[str, Any]:
        return await self.handle.models.remote()

    async def info(self) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.handle.info.remote()
        except BackPressureError as e:
            raise Overloaded(e.retry_after_s) from e


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, max_queued_requests=128,
                  backpressure_config=BackpressureConfig(retry_after_s=2))
@serve.ingress()
class TryOnIngress:
    """HTTP in front of :class:`TryOnModel`: key, body size and fields are checked here."""

    def __init__(self, model, settings: dict[str, Any]):
        self.settings = serve_config_from_dict(settings)
        self.backend = _HandleBackend(model)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.settings, self.backend)


def application(args: dict[str, Any], model_options: dict[str, Any] | None = None,
                ingress_options: dict[str, Any] | None = None) -> serve.Application:
    """Ingress + model bound with ``args`` (:class:`catvton.infer.serving.ServeConfig` fields, checked
    here so that a typo fails the deploy, not the first request); options as ``Deployment.options``.

    A model that runs on CUDA (:func:`catvton.infer.serving.wants_gpu`) reserves a GPU: without
    ``ray_actor_options`` the deployment gets ``num_gpus: 1``; given ones that reserve less are
    refused. A config file's ``deployments:`` section replaces these options after the build (Serve
    applies it on top): a file must say ``num_gpus: 1`` itself, which the replica enforces
    (:func:`catvton.infer.serving.serve_device`) and tests/test_serve_config.py checks."""
    settings = serve_config_from_dict(args)
    if settings.experiments:  # a typo in an arm fails the deploy, not the first user's request
        known = ({p.name for p in repo_path(settings.registry).iterdir() if p.is_dir()} if settings.registry
                 else None)
        try:
            parse_experiments(settings.experiments, known_models=known)
        except ValueError as e:
            raise ConfigError([str(e)]) from e
    plain = json.loads(json.dumps(args or {}))
    model_options = dict(model_options or {})
    if wants_gpu(settings, model_config(settings, pick_lora(settings))):
        model_options["ray_actor_options"] = gpu_actor_options(model_options.get("ray_actor_options"), settings)
    model = TryOnModel.options(**{"backpressure_config": BackpressureConfig(retry_after_s=settings.retry_after_s),
                                  **model_options})
    return TryOnIngress.options(**(ingress_options or {})).bind(model.bind(plain), plain)


def gpu_actor_options(given: dict[str, Any] | None, settings: ServeConfig) -> dict[str, Any]:
    """The model deployment's actor options for a model on CUDA: ``given`` when it reserves a whole
    GPU, the deployment's defaults plus ``num_gpus: 1`` when none are given; less is refused (a
    fraction would put two full-size models on one card)."""
    if given is None:
        return {**(TryOnModel.ray_actor_options or {}), "num_gpus": 1}
    if given.get("num_gpus", 0) < 1:
        why = "device=cuda" if settings.device == "cuda" else "device=auto with a GPU preset (train.use_gpu)"
        raise ConfigError([f"TryOnModel's ray_actor_options {given} reserve no whole GPU but the model runs on CUDA "
                           f"({why}): add num_gpus: 1 ({GPU_FIX})"])
    return dict(given)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application of ``serve/config.yaml`` (``import_path: serve.app:build_app``); the file's
    ``deployments:`` section overrides the options set here."""
    return application(args)
