"""The OpenAI HTTP API's shapes: request validation, response and stream-chunk objects, errors.

Requests are checked field by field into a frozen :class:`CompletionRequest`; anything
malformed or out of range raises :class:`ApiError` (400, naming the parameter), which the
server renders as OpenAI's error JSON::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

Parameters we cannot honour get a 400 that says so, never a silent ignore:
``presence_penalty`` / ``frequency_penalty`` other than 0 (our sampler has the
multiplicative ``repetition_penalty``, accepted as an extension, like ``top_k``),
``logprobs``, ``echo``, ``best_of`` > 1, ``tools``, and non-text ``response_format``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

MAX_STOP_SEQUENCES = 4  # as OpenAI


class ApiError(Exception):
    """An HTTP error in OpenAI's shape. ``status`` 400/401/404/503/500."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class CompletionRequest:
    """One validated ``/v1/completions`` or ``/v1/chat/completions`` request."""

    model: str
    chat: bool
    messages: tuple[dict[str, Any], ...] = ()  # chat: role/content dicts, content flattened to text
    prompt: str | tuple[int, ...] = ""  # completions: text or token ids
    max_tokens: int | None = None
    temperature: float | None = None  # None: the checkpoint's default, else OpenAI's 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _number(body, name, default, low, high, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise _bad(name, f"'{name}' must be between {low} and {high}, got {value!r}")
    return value


def _message_text(message: dict[str, Any], index: int) -> dict[str, Any]:
    """A chat message with list-of-parts content flattened to text (images are refused)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _bad(f"messages[{index}]", f"messages[{index}] must be an object with a string 'role'")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise _bad(f"messages[{index}].content", "only text content parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    elif content is not None and not isinstance(content, str):
        raise _bad(
            f"messages[{index}].content", f"messages[{index}].content must be a string or a list of parts"
        )
    return {**message, "content": content}


def parse_request(body: Any, chat: bool, max_n: int) -> CompletionRequest:
    """Validates a request body. Raises ApiError(400) naming the first bad parameter."""
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "'model' is required (GET /v1/models lists it)")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0, -2.0, 2.0) != 0:
            raise _bad(name, f"'{name}' is not supported by this server; use 'repetition_penalty' (e.g. 1.1)")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs", "'logprobs' is not supported by this server")
    if body.get("echo"):
        raise _bad("echo", "'echo' is not supported by this server")
    if _number(body, "best_of", 1, 1, 1, integer=True) != 1:
        raise _bad("best_of", "'best_of' must be 1")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools", "tool calling is not supported by this server")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise _bad("response_format", "only response_format {'type': 'text'} is supported")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_SEQUENCES:
        stop = tuple(stop)
    else:
        raise _bad("stop", f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} strings")
    if any(not s for s in stop):
        raise _bad("stop", "stop sequences must not be empty")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "'stream' must be a boolean")
    max_tokens = body.get("max_completion_tokens") if chat else None
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _bad(param, f"'{param}' must be a positive integer, got {max_tokens!r}")
    fields: dict[str, Any] = dict(
        model=model, chat=chat, max_tokens=max_tokens, stop=stop, stream=stream,
        temperature=_number(body, "temperature", None, 0.0, 2.0),
        top_p=_number(body, "top_p", None, 0.0, 1.0),
        top_k=_number(body, "top_k", None, 1, 1 << 30, integer=True),
        repetition_penalty=_number(body, "repetition_penalty", None, 0.01, 10.0),
        n=_number(body, "n", 1, 1, max_n, integer=True),
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        include_usage=bool((stream_options or {}).get("include_usage", False)),
    )  # fmt: skip
    if fields["top_p"] == 0:
        raise _bad("top_p", "'top_p' must be greater than 0")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "'messages' must be a non-empty list")
        fields["messages"] = tuple(_message_text(m, i) for i, m in enumerate(messages))
    else:
        fields["prompt"] = _prompt(body.get("prompt"))
    return CompletionRequest(**fields)


def _prompt(prompt: Any) -> str | tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return tuple(prompt)
    raise _bad("prompt", "'prompt' must be a string or a list of token ids (one prompt per request)")


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion_object(request: CompletionRequest, request_id: str, choices: list[tuple[str, str]],
                      prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:  # fmt: skip
    """The non-streaming response; ``choices`` are (text, finish_reason) by index."""
    if request.chat:
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason} for i, (text, reason) in enumerate(choices)]  # fmt: skip
    else:
        items = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(choices)]  # fmt: skip
    return {"id": request_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": items,
            "usage": usage(prompt_tokens, completion_tokens)}  # fmt: skip


def chunk_object(request: CompletionRequest, request_id: str, created: int, index: int | None,
                 text: str | None = None, finish_reason: str | None = None, role: bool = False,
                 usage_value: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """One server-sent event's object, shaped as OpenAI streams it.

    ``index`` None makes the closing usage chunk (no choices)."""
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
                             "created": created, "model": request.model}  # fmt: skip
    if index is None:
        chunk["choices"] = []
    elif request.chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        chunk["choices"] = [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]
    else:
        chunk["choices"] = [
            {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        ]
    if request.include_usage:
        chunk["usage"] = usage_value
    return chunk
