"""The HTTP layer: OpenAI's chat and completions API over the batcher, plus models, profiles and health.

Request bodies are parsed by hand rather than by pydantic models, so every malformed field gets OpenAI's
error JSON (`{"error": {"message", "type", "param", "code"}}`) naming the field and the fix. A request is
validated completely (steering included) before it reaches the batcher, so a bad one never touches a row.
Streaming responses are Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`; a client
that disconnects cancels its row (Starlette cancels the stream, whose `finally` cancels the job).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from grains_edge.errors import GrainsError
from grains_edge.prompts import PLAIN_TURN_STOPS
from grains_edge.runtime.engine import Engine
from grains_edge.runtime.protocol import GenerationSettings
from grains_edge.serve.batcher import Batcher, Failed, Finished, Job, Piece, QueueFull
from grains_edge.serve.steering import AppliedSteering, SteeringError, SteeringResolver, is_finite_number
from grains_edge.steer.profiles import list_profiles

MAX_BODY = 1 << 20  # bytes of a request body
MAX_STOPS = 4  # as OpenAI
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there


class ApiError(Exception):
    """An error answered in OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class Generation:
    """What a completions request asks for, validated."""

    prompt_ids: list[int]
    settings: GenerationSettings
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    steering: AppliedSteering
    ignore_eos: bool


def number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not is_finite_number(value):
        raise invalid(f"{name} must be a finite number, got {value!r}; fix: pass a number", name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}; fix: pass one in range", name)
    return float(value)


def integer(body: dict, name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        limit = "" if low is None else f" ≥ {low}"
        raise invalid(f"{name} must be an integer{limit}, got {value!r}; fix: pass one", name)
    return value


def stop_strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise invalid(f'stop must be a non-empty string or a list of at most {MAX_STOPS}; fix: e.g. ["\\n"]', "stop")
    return tuple(stops)


def chat_messages(value) -> list[dict]:
    """OpenAI messages -> the {role, content} dicts the chat template takes (text parts joined)."""
    if not isinstance(value, list) or not value:
        raise invalid('messages must be a non-empty list; fix: [{"role": "user", "content": "Hi"}]', "messages")
    messages = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(f"each message needs a role among {', '.join(ROLES)}; fix: check {message!r:.80}", "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise invalid('only text content parts are supported; fix: send {"type": "text", ...}', "messages")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise invalid("a message's content must be text; fix: send a string", "messages")
        messages.append({"role": ROLES[message["role"]], "content": content})
    return messages


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(
    engine: Engine,
    batcher: Batcher,
    resolver: SteeringResolver,
    model_id: str,
    api_key: str | None = None,
    max_body: int = MAX_BODY,
) -> FastAPI:
    """The FastAPI app over a running batcher; with `api_key`, every route but /health needs it as a Bearer token."""
    app = FastAPI(title="grains-edge", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return ApiError(error.status_code, str(error.detail), code=code, headers=error.headers).response()

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception) -> JSONResponse:
        return ApiError(500, f"internal error ({type(error).__name__}: {error})", kind="server_error").response()

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key; fix: send 'Authorization: Bearer KEY' with the server's key",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is over {max_body} bytes; fix: send a shorter one")
        if declared.isdigit() and int(declared) > max_body:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body:
                raise too_large
        try:
            body = json.loads(data)
        except ValueError:
            raise invalid("the body is not valid JSON; fix: send a JSON object") from None
        if not isinstance(body, dict):
            raise invalid('the body must be a JSON object; fix: send {"model": ..., ...}')
        return body

    def generation(body: dict, prompt_ids: list[int], prompt_param: str) -> Generation:
        n = integer(body, "n", 1)
        if n is not None and n != 1:
            raise invalid(f"n={n} is not supported, only one choice per request; fix: send n=1 or leave it out", "n")
        room = batcher.capacity - len(prompt_ids)
        if not prompt_ids:
            raise invalid("the prompt is empty; fix: send some text", prompt_param)
        if room < 1:
            raise invalid(
                f"the prompt has {len(prompt_ids)} tokens, the server's context is {batcher.capacity}; "
                "fix: shorten the prompt",
                prompt_param,
                "context_length_exceeded",
            )
        asked = integer(body, "max_completion_tokens", 1) or integer(body, "max_tokens", 1)
        settings = GenerationSettings(
            max_new_tokens=min(asked or room, room),
            temperature=number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            seed=integer(body, "seed"),
            repetition_penalty=number(body, "repetition_penalty", 1.0, 1.0, 2.0),
        )
        stream, ignore_eos = body.get("stream", False), body.get("ignore_eos", False)
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise invalid("stream must be true or false and stream_options an object; fix: check them", "stream")
        if not isinstance(ignore_eos, bool):
            raise invalid("ignore_eos must be true or false; fix: check it", "ignore_eos")
        try:
            steering = resolver.resolve(body.get("steering"))
        except SteeringError as error:
            raise invalid(str(error), "steering", "invalid_steering") from None
        stops = stop_strings(body.get("stop"))
        return Generation(prompt_ids, settings, stops, stream, bool(options.get("include_usage")), steering, ignore_eos)

    async def run(request: Request, spec: Generation, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                job.cancel()

        job = Job(spec.prompt_ids, spec.steering.tensor, spec.settings, emit, spec.stop, spec.ignore_eos)
        try:
            batcher.submit(job)
        except QueueFull:
            raise ApiError(
                429,
                "the server is busy (its queue is full); fix: retry after a second",
                code="queue_full",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            ) from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": ident, "created": created, "model": model_id}
        if spec.stream:
            return StreamingResponse(
                stream(job, events, spec, head, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(abandon, job),  # a client gone before the stream began
            )
        return await collect(request, job, events, spec, head, chat)

    def abandon(job: Job) -> None:
        if not job.done:
            batcher.cancel(job)

    async def collect(request, job, events, spec, head, chat) -> JSONResponse:
        text = []
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL:  # by the clock: pieces may arrive every step
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                if event is None:
                    continue
                if isinstance(event, Piece):
                    text.append(event.text)
                elif isinstance(event, Failed):
                    raise ApiError(500, event.message, kind="server_error")
                else:
                    break
        finally:
            abandon(job)
        content = "".join(text)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": content}}
            if chat
            else {"index": 0, "text": content}
        )
        choice.update(logprobs=None, finish_reason=event.reason)
        return JSONResponse(
            {
                **head,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                "usage": usage(event),
                "steering": spec.steering.applied,
            }
        )

    async def stream(job: Job, events: asyncio.Queue, spec: Generation, head: dict, chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: dict, finish: str | None = None, **extra) -> str:
            choice = {"index": 0, **piece, "logprobs": None, "finish_reason": finish}
            return sse({**head, "object": kind, "choices": [choice], **extra})

        try:
            first = {"delta": {"role": "assistant", "content": ""}} if chat else {"text": ""}
            yield chunk(first, steering=spec.steering.applied)
            while True:
                event = await events.get()
                if isinstance(event, Piece):
                    yield chunk({"delta": {"content": event.text}} if chat else {"text": event.text})
                elif isinstance(event, Failed):
                    yield sse(ApiError(500, event.message, kind="server_error").body())
                    break
                else:
                    yield chunk({"delta": {}} if chat else {"text": ""}, event.reason)
                    if spec.include_usage:
                        yield sse({**head, "object": kind, "choices": [], "usage": usage(event)})
                    break
            yield sse("[DONE]")
        finally:
            abandon(job)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **batcher.counts()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        created = int(engine.export_dir.joinpath("manifest.json").stat().st_mtime)
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "grains-edge"}],
        }

    @app.get("/v1/steering/profiles", dependencies=[Depends(authorized)])
    async def profiles() -> dict:
        listed = []
        for profile in list_profiles():
            metadata = {key: value for key, value in profile.metadata.items() if key != "tuning"}
            listed.append(
                {
                    "name": profile.name,
                    "alpha": profile.alpha,
                    "layers": profile.layers,
                    "method": profile.method,
                    "builtin": profile.builtin,
                    "fits": tuple(profile.vectors.shape) == resolver.shape,
                    "metadata": metadata,
                }
            )
        return {"object": "list", "data": listed, "default": resolver.default.applied}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = chat_messages(body.get("messages"))
        try:
            prompt_ids = engine.chat_ids(messages)
        except GrainsError as error:
            raise invalid(str(error), "messages") from None
        spec = generation(body, prompt_ids, "messages")
        if not engine.has_chat_template:  # a plain prompt: the answer ends where the model starts the next turn
            spec = replace(spec, stop=spec.stop + PLAIN_TURN_STOPS)
        return await run(request, spec, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise invalid('prompt must be one string; fix: send "prompt": "text" (one prompt per request)', "prompt")
        return await run(request, generation(body, engine.tokenizer.encode(prompt), "prompt"), chat=False)

    return app


def usage(event: Finished) -> dict:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }
