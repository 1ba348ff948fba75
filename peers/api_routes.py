"""The OpenAI-compatible HTTP routes of `swarm api` (aiohttp), with their metrics.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``),
``GET /health`` (503 naming the uncovered blocks when no route crosses the swarm) and
``GET /metrics`` (Prometheus: requests by route and status, request seconds, time to
first token, generated tokens, open sessions).

A stream is sent as OpenAI's clients parse it: a first chunk with the assistant role,
content deltas, one chunk per choice with its ``finish_reason``, a usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. The response headers are
sent only once the first token exists, so a request the swarm cannot serve still gets a
real status (503); an error after that arrives as an ``error`` event. Every error body
has OpenAI's shape (:class:`peers.api_schema.ApiError`); a handler never lets an
exception out, so a bad request cannot take the server down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from peers.api_engine import GenerationEngine
from peers.api_schema import ApiError, chunk_object, completion_object, new_id, parse_request, usage
from peers.metrics import metrics_handler

logger = logging.getLogger("swarm.api")


class ApiMetrics:
    """The API's Prometheus series, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "swarm_api_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.seconds = Histogram(
            "swarm_api_request_seconds", "request duration", ["route"], registry=self.registry
        )
        self.first_token = Histogram("swarm_api_time_to_first_token_seconds", "time to the first generated text",
                                     registry=self.registry)  # fmt: skip
        self.tokens = Counter("swarm_api_generated_tokens", "tokens generated", registry=self.registry)
        self.sessions = Gauge("swarm_api_open_sessions", "inference sessions running", registry=self.registry)


def error_of(error: BaseException) -> ApiError:
    """The HTTP error for an exception raised while generating."""
    from swarm import NoRouteError
    from transport.errors import SwarmError

    while isinstance(error, BaseExceptionGroup):  # from a task group: the first cause speaks
        error = error.exceptions[0]
    if isinstance(error, ApiError):
        return error
    if isinstance(error, NoRouteError):
        return ApiError(
            503, f"the swarm cannot serve this model now: {error}", "server_error", code="no_route"
        )
    if isinstance(error, SwarmError):
        return ApiError(503, f"the swarm failed this request: {error}", "server_error")
    logger.exception("request failed", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}", "server_error")


def _json(body, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda value: json.dumps(value, ensure_ascii=False))


class ApiRoutes:
    """Request handlers over one :class:`GenerationEngine`.

    Args:
        engine: runs choices on the swarm.
        model_name: the id clients must send as ``model``.
        api_key: required as ``Authorization: Bearer KEY`` when set.
        max_n: the largest ``n`` accepted.
    """

    def __init__(self, engine: GenerationEngine, model_name: str, api_key: str = "", max_n: int = 16):
        self.engine, self.model_name, self.api_key, self.max_n = engine, model_name, api_key, max_n
        self.metrics = ApiMetrics()
        self.started = int(time.time())

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_and_metrics], client_max_size=8 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.one_model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", metrics_handler(self.metrics.registry))
        return app

    @web.middleware
    async def _errors_and_metrics(self, request: web.Request, handler):
        route = (
            request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
        )
        start, status = time.monotonic(), 500
        try:
            if route.startswith("/v1/"):
                self._check_key(request)
            response = await handler(request)
            status = response.status
            return response
        except ApiError as error:
            status = error.status
            return _json(error.body(), error.status)
        except web.HTTPException as error:  # unknown path, wrong method
            status = error.status
            kind = "invalid_request_error" if error.status < 500 else "server_error"
            return _json(ApiError(error.status, error.reason, kind).body(), error.status)
        except Exception as error:  # a task boundary: answer, log, keep serving
            api_error = error_of(error)
            status = api_error.status
            return _json(api_error.body(), api_error.status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.seconds.labels(route).observe(time.monotonic() - start)

    def _check_key(self, request: web.Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise ApiError(
                401, "You didn't provide an API key (Authorization: Bearer KEY).", code="invalid_api_key"
            )
        if not hmac.compare_digest(header[len("Bearer ") :].encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _model_object(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "swarm"}

    async def models(self, _request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._model_object()]})

    async def one_model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return _json(self._model_object())

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")  # fmt: skip

    async def health(self, _request: web.Request) -> web.Response:
        from swarm import NoRouteError, find_route

        model = self.engine.model
        try:
            servers = await model.list_servers()
            find_route(servers.values(), 0, model.model_config.num_layers)
        except NoRouteError as error:
            return _json({"status": "unavailable", "model": self.model_name, "error": str(error)}, 503)
        except Exception as error:  # the DHT lookup failed: report it, stay up
            return _json({"status": "unavailable", "model": self.model_name, "error": str(error)}, 503)
        return _json({"status": "ok", "model": self.model_name, "servers": len(servers)})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, http: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await http.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}") from error
        request = parse_request(body, chat, self.max_n)
        self._check_model(request.model)
        ids = await asyncio.to_thread(self.engine.prompt_ids, request)
        max_tokens = self.engine.max_tokens(request, len(ids))
        seeds = [None if request.seed is None else request.seed + index for index in range(request.n)]
        if request.stream:
            return await self._stream(http, request, ids, max_tokens, seeds)
        try:
            async with asyncio.TaskGroup() as tasks:
                runs = [tasks.create_task(self._run(request, ids, max_tokens, seed)) for seed in seeds]
        except BaseExceptionGroup as group:
            raise error_of(group) from group
        results = [run.result() for run in runs]
        choices = [(result.text, result.finish_reason) for result in results]
        tokens = sum(result.completion_tokens for result in results)
        return _json(completion_object(request, new_id(chat), choices, len(ids), tokens))

    async def _run(self, request, ids, max_tokens, seed, on_text=None):
        self.metrics.sessions.inc()
        try:
            result = await self.engine.run_choice(request, ids, max_tokens, seed, on_text)
        finally:
            self.metrics.sessions.dec()
        self.metrics.tokens.inc(result.completion_tokens)
        return result

    async def _stream(self, http, request, ids, max_tokens, seeds) -> web.StreamResponse:
        """Server-sent events; n choices run concurrently and their chunks interleave."""
        request_id, created, start = new_id(request.chat), int(time.time()), time.monotonic()
        events: asyncio.Queue = asyncio.Queue()

        async def choice(index: int, seed):
            async def on_text(delta: str) -> None:
                await events.put(("text", index, delta))

            try:
                result = await self._run(request, ids, max_tokens, seed, on_text)
                await events.put(("done", index, result))
            except Exception as error:
                await events.put(("error", index, error))

        response: web.StreamResponse | None = None
        failure: ApiError | None = None
        started: set[int] = set()
        tokens, finished = 0, 0
        async with asyncio.TaskGroup() as tasks:
            children = [tasks.create_task(choice(index, seed)) for index, seed in enumerate(seeds)]
            while finished < len(seeds):
                kind, index, value = await events.get()
                if kind == "error":
                    failure = error_of(value)
                    break
                if response is None:
                    self.metrics.first_token.observe(time.monotonic() - start)
                    response = await _open_events(http)
                chunks = []
                if request.chat and index not in started:  # a choice's first chunk carries the role
                    started.add(index)
                    chunks.append(chunk_object(request, request_id, created, index, "", role=True))
                if kind == "text":
                    chunks.append(chunk_object(request, request_id, created, index, value))
                else:
                    finished += 1
                    tokens += value.completion_tokens
                    chunks.append(
                        chunk_object(request, request_id, created, index, None, value.finish_reason)
                    )
                for chunk in chunks:
                    await _send(response, chunk)
            for child in children:  # after a failure the other choices have nobody to talk to
                child.cancel()
        if failure is not None:
            if response is None:
                raise failure
            await _send(response, failure.body())
        if finished == len(seeds):
            if request.include_usage:
                await _send(response, chunk_object(request, request_id, created, None,
                                                   usage_value=usage(len(ids), tokens)))  # fmt: skip
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _open_events(http: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "Connection": "keep-alive"})  # fmt: skip
    await response.prepare(http)
    return response


async def _send(response: web.StreamResponse, body: dict) -> None:
    await response.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
