"""HTTP service over :class:`clearrec.pipeline.api.Recommender` (FastAPI; the ``service`` extra).

::

    GET  /health                               sizes and index types
    GET  /recommend/{user_id}?k=20&exclude_seen=true[&ef_search=N|&nprobe=N]
    GET  /similar/{item_id}?k=20&source=content|cf[&ef_search=N|&nprobe=N]
    POST /search  {"text": "...", "k": 20}  or  {"image_base64": "...", "k": 20}

Results: ``{"results": [{"item_id", "score", "title"}, ...]}``, best first, identical to the
Python API's. Unknown ids -> 404 with a message; ``k`` outside 1..1000 or a bad parameter ->
422 (also for input that JSON cannot echo back: a lone surrogate, ``1e400``); request bodies
larger than ``max_body_bytes`` -> 413 (checked on the bytes received, not only on
Content-Length); an encoder or index the work directory lacks -> 503.

The work directory is opened once, at start-up. Plain, well-formed ``GET /recommend`` and
``GET /similar`` requests are answered by :class:`FastPath` ahead of FastAPI's routing (same
bytes, less CPU); everything else, errors included, by the FastAPI endpoints, which are plain
functions run by the server's thread pool. FAISS releases the GIL during a search, and
per-request ``ef_search`` / ``nprobe`` are FAISS ``SearchParameters`` objects, so concurrent
requests neither block each other nor change the shared index.
"""

from __future__ import annotations

import base64
import binascii
import json
from urllib.parse import parse_qsl
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Literal

import anyio
from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .api import MAX_K, Hit, Recommender, UnknownIdError, open_workdir
from .errors import ArtifactError, ClearrecError, EncoderUnavailableError

DEFAULT_MAX_BODY = 8 * 2**20
MAX_TEXT_CHARS = 10_000  # longest text query
ECHO_CHARS = 200  # a 422 echoes at most this much of the offending input


class SearchRequest(BaseModel):
    """Body of ``POST /search``: exactly one of ``text`` and ``image_base64``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    image_base64: str | None = Field(None, min_length=1)
    k: int = Field(20, ge=1, le=MAX_K)
    ef_search: int | None = Field(None, ge=1, le=65536)
    nprobe: int | None = Field(None, ge=1, le=65536)

    @field_validator("text")
    @classmethod
    def _unicode(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text is not valid Unicode (a lone surrogate at position {e.start})") from None
        return v

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        if (self.text is None) == (self.image_base64 is None):
            raise ValueError("give exactly one of 'text' and 'image_base64'")
        return self


class HitOut(BaseModel):
    item_id: str
    score: float
    title: str


class Results(BaseModel):
    results: list[HitOut]


def create_app(workdir: str | Path | None = None, recommender: Recommender | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, warm_up: bool = True, **open_kwargs: Any) -> FastAPI:
    """The FastAPI app over ``workdir`` (opened at start-up) or an already open ``recommender``."""
    if (workdir is None) == (recommender is None):
        raise ValueError("give exactly one of workdir and recommender")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rec = recommender if recommender is not None else open_workdir(workdir, **open_kwargs)
        if warm_up:
            try:
                rec.warm_up()
            except (EncoderUnavailableError, ArtifactError):
                pass  # raised again, as a 503 with its message, by the queries that need the encoder
        state["rec"] = rec
        yield
        state.clear()
        if recommender is None:  # opened here: closed here (a recommender passed in is its caller's)
            rec.close()

    app = FastAPI(title="clearrec", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_middleware(FastPath, state=state)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)  # added last: outermost
    K = Query(20, ge=1, le=MAX_K, description="number of results (1..1000)")
    EF = Query(None, ge=1, le=65536, description="HNSW efSearch for this request")
    NPROBE = Query(None, ge=1, le=65536, description="IVF nprobe for this request")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **state["rec"].health()}

    @app.get("/recommend/{user_id}", response_model=Results)
    def recommend(user_id: str = PathParam(...), k: int = K, exclude_seen: bool = True,
                  ef_search: int | None = EF, nprobe: int | None = NPROBE) -> Response:
        return _answer(lambda: state["rec"].recommend(user_id, k, exclude_seen, ef_search, nprobe))

    @app.get("/similar/{item_id}", response_model=Results)
    def similar(item_id: str = PathParam(...), k: int = K, source: Literal["content", "cf"] = "content",
                ef_search: int | None = EF, nprobe: int | None = NPROBE) -> Response:
        return _answer(lambda: state["rec"].similar(item_id, k, source, ef_search, nprobe))

    @app.post("/search", response_model=Results)
    def search(body: SearchRequest) -> Response:
        rec: Recommender = state["rec"]
        if body.text is not None:
            return _answer(lambda: rec.search_text(body.text, body.k, body.ef_search, body.nprobe))
        try:
            data = base64.b64decode(body.image_base64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise HTTPException(422, f"image_base64 is not valid base64: {e}") from e
        return _answer(lambda: rec.search_image(data, body.k, body.ef_search, body.nprobe))

    return app


async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """422 with FastAPI's error list; inputs JSON cannot carry (inf, lone surrogates) echoed as their repr."""
    detail = [{"type": e.get("type"), "loc": [p if isinstance(p, (int, str)) else str(p) for p in e.get("loc", ())],
               "msg": str(e.get("msg")), "input": _echo(e.get("input"))} for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def _echo(value: Any) -> Any:
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        return ascii(value)[:ECHO_CHARS]
    return value if len(text) <= ECHO_CHARS else ascii(value)[:ECHO_CHARS]


def _answer(query: Callable[[], list[Hit]]) -> Response:
    """Run a query; map clearrec's errors onto HTTP status codes.

    The body is serialised here, once (the hits are already typed), rather than validated
    again against the response model: that per-hit validation was most of a request's cost.
    """
    try:
        body = json.dumps({"results": [h.to_dict() for h in query()]}, ensure_ascii=False)
        return Response(body.encode(), media_type="application/json")
    except UnknownIdError as e:
        raise HTTPException(404, str(e)) from e
    except (EncoderUnavailableError, ArtifactError) as e:
        raise HTTPException(503, str(e)) from e
    except ValueError as e:  # bad knob for this index type, undecodable image, ...
        raise HTTPException(422, str(e)) from e


class FastPath:
    """ASGI middleware: answer well-formed ``GET /recommend/{id}`` and ``/similar/{id}`` directly.

    These two endpoints are most of the traffic, and FastAPI's routing and parameter
    validation cost about twice the query itself. A request whose parameters are all present
    in their plain form (``k`` and knobs as digits within bounds, ``exclude_seen`` as
    true / false / 1 / 0, ``source`` as content / cf, no repeated or unknown keys) and whose
    query succeeds is answered here with the same bytes the endpoint would send; anything
    else (every error included) goes on to FastAPI, which validates and answers as usual.
    A query over an index cheap to scan runs on the event loop; others go to the thread pool.
    """

    RANGES = {"k": (1, MAX_K), "ef_search": (1, 65536), "nprobe": (1, 65536)}
    FLAGS = {"true": True, "false": False, "1": True, "0": False}
    INLINE_MAX = 1 << 22  # rows x dim of an exact index searched on the event loop (~1 ms)

    def __init__(self, app: Any, state: dict[str, Any]):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        call = self._parse(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        if call is not None:
            index, query = call
            try:
                if index.knob is not None or index.index.ntotal * index.index.d <= self.INLINE_MAX:
                    hits = query()
                else:
                    hits = await anyio.to_thread.run_sync(query)
            except (ClearrecError, ValueError):
                hits = None  # FastAPI answers again, with the proper error
            if hits is not None:
                body = json.dumps({"results": [h.to_dict() for h in hits]}, ensure_ascii=False).encode()
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _parse(self, scope: dict) -> tuple[Any, Callable[[], list[Hit]]] | None:
        """(the LoadedIndex searched, the query) for a plain, well-formed request; else None."""
        kind, _, key = scope["path"].lstrip("/").partition("/")
        rec: Recommender | None = self.state.get("rec")
        if kind not in ("recommend", "similar") or not key or "/" in key or rec is None:
            return None
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        args = dict(pairs)
        allowed = {"k", "ef_search", "nprobe", "exclude_seen" if kind == "recommend" else "source"}
        if len(args) != len(pairs) or not set(args) <= allowed:
            return None
        num: dict[str, int | None] = {"k": 20, "ef_search": None, "nprobe": None}
        for name, (lo, hi) in self.RANGES.items():
            if name in args:
                if not (args[name].isascii() and args[name].isdigit()) or not lo <= int(args[name]) <= hi:
                    return None
                num[name] = int(args[name])
        if kind == "recommend":
            flag = self.FLAGS.get(args.get("exclude_seen", "true"))
            if flag is None:
                return None
            return rec.items, lambda: rec.recommend(key, num["k"], flag, num["ef_search"], num["nprobe"])
        source = args.get("source", "content")
        index = rec.items if source == "cf" else rec.content if source == "content" else None
        if index is None:
            return None
        return index, lambda: rec.similar(key, num["k"], source, num["ef_search"], num["nprobe"])


class BodyLimit:
    """ASGI middleware: answer 413 to a request whose body exceeds ``max_bytes``.

    Reads the body (up to one byte past the limit) before the app sees it, so a missing or
    false Content-Length does not get a large body through.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared in (None, b"0") and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body (e.g. GET): nothing to count
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: dict, receive: Callable, send: Callable) -> None:
        response = JSONResponse({"detail": f"request body larger than {self.max_bytes} bytes"}, status_code=413)
        await response(scope, receive, send)
