"""The HTTP routes of `edge-tune serve` (serve.py holds the service behind them): parsing, validation to
one-line JSON errors, the bearer token on patch management, and the watched folder's poll.

    POST   /v1/predict                {"texts": [...], "patch": "name"} or {"texts": [...], "patches": [...]}
    GET    /v1/patches                the loaded patches, their method, bytes and which is active
    POST   /v1/patches                {"file": "x.patch", "name": "x"} from the folder, or the patch's bytes
                                      (application/octet-stream, ?name=x)
    DELETE /v1/patches/{name}
    POST   /v1/patches/{name}/activate   the patch answering requests that name none
    GET    /healthz, GET /metrics     (Prometheus text)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from .serve import RequestError, ServeConfig, Service

log = logging.getLogger("edge_tune")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a patch name: no separators, no leading dot
SERVICE = web.AppKey("service", Service)


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _json_errors(request: web.Request, handler):
    """Every answer that is not 2xx is one line of JSON, aiohttp's own (404, 405, 413) included; each is
    counted by status code, and each prediction's latency observed."""
    svc, t0 = request.app[SERVICE], time.perf_counter()
    try:
        resp = await handler(request)
    except RequestError as e:
        resp = _error(e.status, str(e), e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        line = (e.text or e.reason or "").splitlines()[0] if (e.text or e.reason) else e.reason
        resp = _error(e.status, line.removeprefix(f"{e.status}: "))
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as e:  # a bug, not bad input: still one line, and logged whole
        log.exception("internal error on %s %s", request.method, request.path)
        resp = _error(
            500, f"internal error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
    svc.requests[str(resp.status)] = svc.requests.get(str(resp.status), 0) + 1
    if request.path == "/v1/predict" and resp.status == 200:
        svc.latency.observe(time.perf_counter() - t0)
    return resp


async def _body(request: web.Request) -> bytes:
    svc = request.app[SERVICE]
    try:
        return await asyncio.wait_for(request.read(), svc.cfg.read_timeout_s)
    except TimeoutError:
        raise RequestError(408, f"request body not received within {svc.cfg.read_timeout_s:g} s") from None


async def _json(request: web.Request) -> dict:
    raw = await _body(request)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(doc).__name__}")
    return doc


def _authorised(request: web.Request) -> None:
    token = request.app[SERVICE].token
    if token is not None and request.headers.get("Authorization", "") != f"Bearer {token}":
        raise RequestError(401, "patch management needs 'Authorization: Bearer <token>'")


def _check_texts(doc: dict, svc: Service) -> tuple[list[str], list[str]]:
    texts = doc.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, '"texts" must be a non-empty list of strings')
    if len(texts) > svc.cfg.max_texts:
        raise RequestError(413, f"{len(texts)} texts in one request; at most {svc.cfg.max_texts}")
    for i, t in enumerate(texts):
        if not t.strip():
            raise RequestError(400, f"texts[{i}] is empty")
        if len(t) > svc.cfg.max_chars:
            raise RequestError(413, f"texts[{i}] has {len(t)} characters; at most {svc.cfg.max_chars}")
    unknown = sorted(doc.keys() - {"texts", "patch", "patches"})
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; use texts and patch or patches")
    if "patches" in doc:
        patches = doc["patches"]
        if (
            not isinstance(patches, list)
            or len(patches) != len(texts)
            or not all(isinstance(p, str) for p in patches)
        ):
            raise RequestError(400, '"patches" must be a list of patch names, one per text')
    else:
        patch = doc.get("patch", svc.default)
        if patch is None:
            raise RequestError(409, "no patch is active and the request names none")
        if not isinstance(patch, str):
            raise RequestError(400, '"patch" must be a patch name')
        patches = [patch] * len(texts)
    missing = sorted(set(patches) - svc.bank.patches.keys())
    if missing:
        raise RequestError(
            404, f"no patch named {missing[0]!r}; loaded: {', '.join(sorted(svc.bank.patches)) or 'none'}"
        )
    return texts, patches


async def predict(request: web.Request) -> web.Response:
    svc, t0 = request.app[SERVICE], time.perf_counter()
    texts, patches = _check_texts(await _json(request), svc)
    preds = await svc.predict(texts, patches)
    results = [{"label": p.label, "probability": round(p.probability, 6), "patch": p.patch} for p in preds]
    return web.json_response({"results": results, "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})


async def list_patches(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    sizes = svc.bank.memory_bytes()
    return web.json_response({"active": svc.default, "patches": [
        {"name": n, "method": p.manifest.method, "task": p.manifest.task, "bytes": sizes.get(n, 0),
         "labels": p.manifest.label_names} for n, p in sorted(svc.bank.patches.items())]})  # fmt: skip


async def add_patch(request: web.Request) -> web.Response:
    _authorised(request)
    svc = request.app[SERVICE]
    loop = asyncio.get_running_loop()
    # an upload (said explicitly: aiohttp reads a missing Content-Type as octet-stream), validated from a copy
    if request.headers.get("Content-Type", "").startswith("application/octet-stream"):
        name = request.query.get("name", "")
        if not NAME.match(name):
            raise RequestError(400, "an upload needs ?name= (letters, digits, '.', '_', '-')")
        data = await _body(request)
        fd, tmp = tempfile.mkstemp(suffix=".patch")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            loaded = await loop.run_in_executor(svc.pool, svc.load_file, Path(tmp), name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return web.json_response({"loaded": loaded}, status=201)
    doc = await _json(request)
    file = doc.get("file")
    if not isinstance(file, str) or not file:
        raise RequestError(400, '"file" must name a .patch file in the patches folder')
    path = (svc.folder / file).resolve()
    if not path.is_relative_to(svc.folder):
        raise RequestError(403, f"{file!r} is outside the patches folder")
    if not path.is_file():
        raise RequestError(404, f"no file {file!r} in the patches folder")
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not NAME.match(name):
        raise RequestError(400, '"name" must be letters, digits, ".", "_", "-"')
    loaded = await loop.run_in_executor(svc.pool, svc.load_file, path, name)
    return web.json_response({"loaded": loaded}, status=201)


async def delete_patch(request: web.Request) -> web.Response:
    return await _on_loaded(request, lambda svc: svc.unload, "unloaded")


async def activate_patch(request: web.Request) -> web.Response:
    return await _on_loaded(request, lambda svc: svc.activate, "active")


async def _on_loaded(request: web.Request, action, key: str) -> web.Response:
    """Apply `action(service)(name)` to a loaded patch, on the pass thread (between passes, never during)."""
    _authorised(request)
    svc, name = request.app[SERVICE], request.match_info["name"]
    if name not in svc.bank.patches:
        raise RequestError(404, f"no patch named {name!r}")
    await asyncio.get_running_loop().run_in_executor(svc.pool, action(svc), name)
    return web.json_response({key: name})


async def healthz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response({"status": "ok", "patches": len(svc.bank.patches), "active": svc.default})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SERVICE].metrics(), content_type="text/plain")


async def _background(app: web.Application):
    svc = app[SERVICE]
    tasks = [asyncio.create_task(svc.batcher())]
    if svc.cfg.watch_s > 0:
        tasks.append(asyncio.create_task(_watch(svc)))
    yield
    for t in tasks:
        t.cancel()
    svc.pool.shutdown(wait=True)


async def _watch(svc: Service) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(svc.cfg.watch_s)
        await loop.run_in_executor(svc.pool, svc.rescan)


def build_app(svc: Service) -> web.Application:
    app = web.Application(middlewares=[_json_errors], client_max_size=svc.cfg.max_body_kb * 1024)
    app[SERVICE] = svc
    app.router.add_post("/v1/predict", predict)
    app.router.add_get("/v1/patches", list_patches)
    app.router.add_post("/v1/patches", add_patch)
    app.router.add_delete("/v1/patches/{name}", delete_patch)
    app.router.add_post("/v1/patches/{name}/activate", activate_patch)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_background)
    return app


def serve(cfg: ServeConfig) -> None:
    """Run the service until SIGINT / SIGTERM."""
    from .profiles import load_profile
    from .trainer import set_threads

    set_threads(load_profile(cfg.profile), cfg.threads)  # before the pass thread's first parallel op
    svc = Service(cfg)
    # The pass thread runs Python between torch ops holding the GIL; at the default 5 ms switch interval the
    # event loop could wait that long to parse or answer a request that needs no pass at all.
    sys.setswitchinterval(0.001)
    print(f"serving {len(svc.bank.patches)} patch(es) from {svc.folder} on http://{cfg.host}:{cfg.port} "
          f"(active {svc.default}, window {svc.window_s * 1000:g} ms, pass <= {svc.max_batch} sentences"
          f"{', batching off' if not cfg.batching else ''})", flush=True)  # fmt: skip
    web.run_app(build_app(svc), host=cfg.host, port=cfg.port, print=None, access_log=None)
