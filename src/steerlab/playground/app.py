"""The HTTP side of the playground (Starlette): the page, a JSON API, and generation streamed as
server-sent events (`text/event-stream`, one JSON object per `data:` line).

Requests that change anything are POSTs with a JSON body (`Content-Type: application/json`), which a
page from another origin cannot send without a CORS preflight that this server never grants; the Host
header must name this machine unless the server was started for other hosts; every response forbids
inline scripts (Content-Security-Policy), and result files are served in a sandbox.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from steerlab.errors import UserError
from steerlab.playground.core import Playground
from steerlab.playground.settings import SettingError

log = logging.getLogger(__name__)

LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
MAX_BODY = 6_000_000
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'"
)
RESULT_CSP = "sandbox; default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _static(name: str) -> str:
    return resources.files("steerlab.playground").joinpath("static", name).read_text(encoding="utf-8")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise SettingError("request: send JSON (Content-Type: application/json)")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise SettingError(f"request: {len(body)} bytes; at most {MAX_BODY}")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SettingError(f"request: not valid JSON ({error})") from None


def _public_rows(rows: list[dict]) -> list[dict]:
    """Sweep rows without the per-item tensors."""
    return [{k: v for k, v in row.items() if k != "item_scores"} for row in rows]


def create_app(playground: Playground, allowed_hosts: list[str] | None = None) -> Starlette:
    """The Starlette app serving `playground`; `allowed_hosts` defaults to this machine's names."""
    pg = playground

    async def run_job(fn, *args):
        """Run `fn(*args)` on the model worker and wait for it without blocking the event loop."""
        return await asyncio.wrap_future(pg.worker.submit(fn, *args))

    async def index(_request: Request) -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _error(404, f"no file {name!r}")
        return Response(_static(name), media_type=f"{STATIC[name]}; charset=utf-8")

    async def state(_request: Request) -> Response:
        return JSONResponse(pg.state())

    async def rescan(_request: Request) -> Response:
        await run_job(pg.scan_vectors)
        return JSONResponse(pg.state())

    async def extract(request: Request) -> Response:
        future = pg.extract(await _json_body(request))
        entry = await asyncio.wrap_future(future)
        return JSONResponse(entry.describe())

    async def generate(request: Request) -> Response:
        job = pg.generation_request(await _json_body(request))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        finished = object()
        gone = False

        def emit(event: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        queued = pg.worker.pending
        future = pg.worker.submit(pg.run_generation, job, emit, lambda: gone)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(events.put_nowait, finished))

        async def stream():
            nonlocal gone
            try:
                yield _sse({"queued": queued, **job["setting"].describe()})
                while (event := await events.get()) is not finished:
                    yield _sse(event)
                error = future.exception()
                if error is not None:
                    yield _sse({"error": _message(error)})
                yield _sse({"end": True})
            finally:
                gone = True

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def metrics(request: Request) -> Response:
        setting, data, limit = pg.metrics_request(await _json_body(request))
        return JSONResponse(await run_job(pg.run_metrics, setting, data, limit))

    async def sweep_start(request: Request) -> Response:
        return JSONResponse(pg.start_sweep(await _json_body(request)).describe())

    def _sweep(request: Request):
        job = pg.sweeps.get(request.path_params["id"])
        if job is None:
            raise SettingError(f"sweep: no sweep {request.path_params['id']!r}")
        return job

    async def sweep_status(request: Request) -> Response:
        job = _sweep(request)
        return JSONResponse({**job.describe(), "rows": _public_rows(job.rows)})

    async def sweep_file(request: Request) -> Response:
        from steerlab.steering.sweep import rows_to_csv

        job = _sweep(request)
        name = request.path_params["name"]
        if job.state != "done":
            raise SettingError(f"sweep: {job.id} is {job.state}")
        if name == "sweep.csv":
            return Response(
                rows_to_csv(job.rows),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="sweep-{job.id}.csv"'},
            )
        image = job.images.get(name.removesuffix(".png")) if name.endswith(".png") else None
        if image is None:
            return _error(404, f"no file {name!r}")
        return Response(image, media_type="image/png")

    async def results(_request: Request) -> Response:
        return JSONResponse({"runs": pg.list_results()})

    async def result_table(request: Request) -> Response:
        path = pg.result_path(request.query_params.get("path", ""))
        if path.suffix != ".csv":
            raise SettingError("results: tables are .csv files")
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            rows = list(csv.reader(io.StringIO(handle.read(2_000_000))))
        return JSONResponse(
            {"header": rows[0] if rows else [], "rows": rows[1:1001], "total": max(0, len(rows) - 1)}
        )

    async def result_file(request: Request) -> Response:
        path = pg.result_path(request.path_params["path"])
        response = FileResponse(path)
        response.headers["Content-Security-Policy"] = RESULT_CSP
        return response

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/api/state", state),
        Route("/api/rescan", rescan, methods=["POST"]),
        Route("/api/extract", extract, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/metrics", metrics, methods=["POST"]),
        Route("/api/sweep", sweep_start, methods=["POST"]),
        Route("/api/sweep/{id}", sweep_status),
        Route("/api/sweep/{id}/{name}", sweep_file),
        Route("/api/results", results),
        Route("/api/results/table", result_table),
        Route("/results/{path:path}", result_file),
    ]

    async def user_error(_request: Request, error: Exception) -> Response:
        return _error(400, _message(error))

    async def server_error(_request: Request, error: Exception) -> Response:
        return _error(500, _message(error))

    return Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOCAL_HOSTS),
        ],
        exception_handlers={UserError: user_error, Exception: server_error},
    )


class SecurityHeaders:
    """ASGI middleware: no MIME sniffing, no referrer, and the page's CSP unless a route set its own."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                extra = {**SECURITY_HEADERS, "Content-Security-Policy": PAGE_CSP}
                for key, value in extra.items():
                    if key.lower().encode() not in names:
                        headers.append((key.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


def _message(error: BaseException) -> str:
    if isinstance(error, UserError):
        return str(error)
    log.error("request failed", exc_info=error)
    return f"internal error ({type(error).__name__}): {error}"
