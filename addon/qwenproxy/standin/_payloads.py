"""OpenAI-compatible request checks and answer bodies, as pure functions.

The reply is deterministic so tests can assert on it: a greeting that echoes the last user message.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ._service import ApiError

GREETING = "Hello from the Qwen stand-in."
MODELS = ("coder-model", "qwen3-coder-plus", "qwen3-coder-flash")
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]
    stream: bool
    include_usage: bool


def parse_chat_request(body: bytes) -> ChatRequest:
    """Check a chat completion request the way a strict server would; raise a 400 ApiError."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, "Request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "Request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a non-empty string")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty array")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a valid 'role'")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean")
    options = data.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ChatRequest(model, messages, stream, include_usage)


def reply_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            said = _text(message.get("content"))
            if said:
                return f"{GREETING} You said: {said}"
    return GREETING


def completion(request: ChatRequest, created: int) -> dict:
    """A non-streamed `chat.completion` answer."""
    text = reply_text(request.messages)
    return {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": _usage(request.messages, text),
    }


def stream_events(request: ChatRequest, created: int, chunks: int) -> list[dict]:
    """The `chat.completion.chunk` events of a streamed answer, without the final `[DONE]`.

    `chunks` content-bearing events (the first also carries the role), then one with
    finish_reason, then a usage event when the client asked for it with stream_options.
    """
    text = reply_text(request.messages)
    cid = _completion_id()

    def chunk(delta: dict, finish_reason: str | None) -> dict:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    # A piece cannot be shorter than one character; a long reply is what a high count needs.
    pieces = split_text(text, max(1, min(chunks, len(text))))
    events = [chunk({"role": "assistant", "content": pieces[0]}, None)]
    events += [chunk({"content": piece}, None) for piece in pieces[1:]]
    events.append(chunk({}, "stop"))
    if request.include_usage:
        events.append({**chunk({}, None), "choices": [], "usage": _usage(request.messages, text)})
    return events


def split_text(text: str, n: int) -> list[str]:
    """Split `text` into `n` non-empty pieces (at word boundaries when there are enough words).

    The pieces join back to `text`. Raises ValueError when `text` is shorter than `n` characters.
    """
    if n < 1 or len(text) < n:
        raise ValueError(f"cannot split {len(text)} characters into {n} pieces")
    # Words keep their trailing space so that joining the pieces restores the text.
    words = text.split(" ")
    words = [w + " " for w in words[:-1]] + [words[-1]]
    if len(words) < n:
        words = list(text)
    size, extra = divmod(len(words), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append("".join(words[start:end]))
        start = end
    return pieces


def models_list(created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": "qwen"} for m in MODELS],
    }


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _usage(messages: list[dict], text: str) -> dict:
    # Words stand in for tokens: deterministic, and good enough for clients that sum usage.
    prompt = sum(len(_text(m.get("content")).split()) for m in messages)
    completion_tokens = len(text.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
