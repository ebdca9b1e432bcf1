"""A canned OpenAI chat-completion stream, as vLLM writes it, for the gateway benchmark.

``sse_body(chunks)`` is ``chunks`` ``data: {...}`` events (role, content deltas, finish, usage)
then ``data: [DONE]``. Every JSON event is padded with spaces (valid JSON whitespace) to the same
length, so nginx with ``output_buffers 1 <event_bytes>`` writes exactly one event per chunk.
"""

from __future__ import annotations

import json

WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", " It", " was",
         " a", " bright", " cold", " day", " in", " April", ",", " and", " the", " clocks", " were", " striking")


def _events(chunks: int, model: str) -> list[dict[str, object]]:
    base = {"id": "chatcmpl-4f9a1c2e7b3d4e5f8a9b0c1d2e3f4a5b", "object": "chat.completion.chunk",
            "created": 1732350000, "model": model}
    content = max(0, chunks - 3)
    events: list[dict[str, object]] = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": WORDS[i % len(WORDS)]}, "logprobs": None,
                                     "finish_reason": None}]} for i in range(content)]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop",
                                        "stop_reason": None}]})
    events.append({**base, "choices": [], "usage": {"prompt_tokens": 17, "total_tokens": 17 + content,
                                                    "completion_tokens": content}})
    return events[:chunks] if chunks < 3 else events


def sse_body(chunks: int = 64, model: str = "bench") -> tuple[bytes, int]:
    """(the whole stream, bytes per padded event)."""
    lines = [b"data: " + json.dumps(e, separators=(",", ":")).encode() for e in _events(chunks, model)]
    width = max(len(line) for line in lines)
    padded = [line.ljust(width) + b"\n\n" for line in lines]
    return b"".join(padded) + b"data: [DONE]\n\n", width + 2
