"""The explorer's HTTP API and page: FastAPI endpoints over a Catalog of runs.

Pictures come as PNG for image models; for text models the same endpoints answer JSON
{"sentences": [...]}: greedy decodes (GET /api/summary says which: "kind" is "image" or "text").
Every error a client can cause is answered as JSON {"detail": "..."} with status 4xx: 422 for values
out of range or malformed, 400 for requests the run's model cannot serve (no prior, no temperature).
Endpoints are plain functions, so uvicorn runs them in its thread pool while the event loop stays free.
"""
from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BeforeValidator

from ..errors import VaelabError
from .catalog import MAX_NAME, Catalog
from .explorer import MAX_FRAMES, MAX_SAMPLES, RequestError

STATIC = Path(__file__).parent / "static"
MAX_Z_QUERY = 16_384  # characters; the per-model cap (explorer.Z_CHARS_PER_DIM * D) is usually tighter
MAX_INDEX = 2**31  # larger indices are refused by FastAPI before any range check
# the page needs nothing from elsewhere: this keeps it working offline and refuses injected resources
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]

log = logging.getLogger("vaelab.web")


def _plain(value: Any) -> Any:
    """A number as people write it: Python's and pydantic's parsers read "1_0" as 10."""
    if isinstance(value, str) and "_" in value:
        raise ValueError(f"{value!r} is not a plain number (no underscores)")
    return value


Plain = BeforeValidator(_plain)  # (inside Annotated with the Query: beside a Query default FastAPI drops it)
RunName = Query(None, max_length=MAX_NAME, description="a run name from GET /api/runs (default: the first)")
Index = Annotated[int, Plain, PathParam(ge=-MAX_INDEX, le=MAX_INDEX, description="index of a test image")]
Count = Annotated[int, Plain, Query(ge=-MAX_INDEX, le=MAX_INDEX)]  # (ranges checked with their own message)


def _png(data: bytes) -> Response:
    return Response(content=data, media_type="image/png", headers={"Cache-Control": "no-cache"})


def _reply(view: bytes | list[str]) -> Response:
    """A picture (PNG bytes) or sentences (a text model's), as the response."""
    if isinstance(view, bytes):
        return _png(view)
    return JSONResponse({"sentences": view}, headers={"Cache-Control": "no-cache"})


def _host_name(header: str) -> str:
    """The host of a Host header without its port: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    if not header.endswith("]") and ":" in header:
        header = header.rsplit(":", 1)[0]
    return header.strip("[]").lower()


def _validation_message(error: RequestValidationError) -> str:
    """FastAPI's list of problems as one readable line: "query parameter n: Input should be ..."."""
    parts = []
    for e in error.errors():
        where = [str(p) for p in e.get("loc", ())]
        kind = {"query": "query parameter", "path": "path parameter"}.get(where[0], where[0]) if where else ""
        parts.append(f"{kind} {'.'.join(where[1:])}: {e.get('msg', 'invalid')}".strip())
    return "; ".join(parts) or "invalid request"


def create_app(root: Path | str | Catalog, *, device: str = "cpu", allowed_hosts: list[str] | None = None) -> FastAPI:
    """The explorer app for a run folder or a folder of runs (or a ready Catalog).

    Args:
        root: a run directory, a directory containing runs, or a Catalog.
        device: where the models run.
        allowed_hosts: Host headers to accept (e.g. LOOPBACK_HOSTS against DNS rebinding); None accepts any.
    """
    if not (STATIC / "index.html").is_file():
        raise VaelabError(f"the explorer's page is missing from this installation ({STATIC}); reinstall vaelab "
                          "with its package data (vaelab/web/static/*)")
    catalog = root if isinstance(root, Catalog) else Catalog(Path(root), device=device)
    app = FastAPI(title="vaelab latent explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.catalog = catalog
    allowed = None if allowed_hosts is None else {h.strip("[]").lower() for h in allowed_hosts}

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if allowed is not None and _host_name(request.headers.get("host", "")) not in allowed:
            response = JSONResponse({"detail": "this server answers only requests addressed to this machine "
                                               f"(Host: {' or '.join(sorted(allowed))})"}, status_code=400)
        else:
            response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("error answering %s", request.url.path)  # the traceback stays in the server's log
        return JSONResponse({"detail": f"internal error ({type(error).__name__}); see the server's log"},
                            status_code=500)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: `curl -I`, health checks
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        return catalog.listing()

    @app.get("/api/summary")
    def summary(run: str | None = RunName) -> dict[str, Any]:
        return catalog.get(run).current_summary()

    @app.get("/api/map")
    def latent_map(run: str | None = RunName) -> dict[str, Any]:
        return catalog.get(run).map

    @app.get("/api/encoding/{index}")
    def encoding(index: Index, run: str | None = RunName) -> dict[str, Any]:
        explorer = catalog.get(run)
        return explorer.encoding(explorer.check_index(index))

    @app.get("/api/decode", response_class=Response)
    def decode(z: str = Query(..., max_length=MAX_Z_QUERY, description="comma-separated latent vector"),
               run: str | None = RunName) -> Response:
        explorer = catalog.get(run)
        decode_view = explorer.decode_text if explorer.is_text else explorer.decode_png
        return _reply(decode_view(explorer.parse_z(z)))

    @app.get("/api/reconstruct/{index}", response_class=Response)
    def reconstruct(index: Index, run: str | None = RunName) -> Response:
        explorer = catalog.get(run)
        reconstruct_view = explorer.reconstruct_text if explorer.is_text else explorer.reconstruct_png
        return _reply(reconstruct_view(explorer.check_index(index)))

    @app.get("/api/interpolate", response_class=Response)
    def interpolate(a: Count, b: Count, n: Annotated[Count, Query(description=f"frames, 2..{MAX_FRAMES}")] = 10,
                    run: str | None = RunName) -> Response:
        explorer = catalog.get(run)
        interpolate_view = explorer.interpolate_text if explorer.is_text else explorer.interpolate_png
        response = _reply(interpolate_view(explorer.check_index(a, "a"), explorer.check_index(b, "b"), n))
        response.headers["X-Frames"] = str(n)
        return response

    @app.get("/api/samples", response_class=Response)
    def samples(n: Annotated[Count, Query(description=f"samples, 1..{MAX_SAMPLES}")] = 16,
                t: Annotated[float, Plain, Query(description="temperature (hierarchical models)")] = 1.0,
                seed: Annotated[int | None, Plain, Query(ge=0, le=2**32 - 1)] = None,
                run: str | None = RunName) -> Response:
        explorer = catalog.get(run)
        seed = secrets.randbelow(2**31) if seed is None else seed
        samples_view = explorer.samples_text if explorer.is_text else explorer.samples_png
        response = _reply(samples_view(n, t, seed))
        response.headers["X-Seed"] = str(seed)
        return response

    return app
