"""The sim engine's /v1/responses answers: the ``response`` object and its event stream, as vLLM writes them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.sim.server import Generation


@dataclass
class ResponseDraft:
    """One /v1/responses answer, its text decided up front; renders the ``response`` object."""

    rid: str
    item_id: str
    created: int
    model: str
    request: dict[str, Any]
    gen: Generation
    tokens: list[str]

    def text(self, upto: int | None = None) -> str:
        return "".join(self.tokens[:upto])

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message(self, *, done: bool) -> dict[str, Any]:
        return {"id": self.item_id, "type": "message", "role": "assistant",
                "status": "completed" if done else "in_progress",
                "content": [{**self.part(self.text()), "logprobs": None}] if done else []}

    def response(self, *, done: bool) -> dict[str, Any]:
        """The ``response`` object: in progress (no output, no usage) or final.

        As vLLM: an answer cut by ``max_output_tokens`` is ``incomplete``, else ``completed``.
        """
        cut = self.gen.finish_reason == "length"
        status = ("incomplete" if cut else "completed") if done else "in_progress"
        usage = {"input_tokens": self.gen.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": self.gen.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": self.gen.prompt_tokens + self.gen.completion_tokens}
        req = self.request
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "model": self.model,
            "status": status, "incomplete_details": {"reason": "max_output_tokens"} if done and cut else None,
            "error": None, "instructions": req.get("instructions"), "metadata": req.get("metadata"),
            "output": [self.message(done=True)] if done else [], "parallel_tool_calls": True,
            "temperature": req.get("temperature"), "top_p": req.get("top_p"), "tool_choice": "auto", "tools": [],
            "max_output_tokens": req.get("max_output_tokens"), "previous_response_id": None, "reasoning": None,
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "background": False,
            "service_tier": "auto", "user": req.get("user"), "usage": usage if done else None,
        }


class ResponseEvents:
    """The Responses API's stream for one draft, as bytes, with increasing ``sequence_number``s.

    created, in_progress | output_item.added, content_part.added, output_text.delta (one per token) |
    output_text.done, content_part.done, output_item.done, completed
    """

    def __init__(self, draft: ResponseDraft) -> None:
        self.draft = draft
        self.sequence = 0

    def _event(self, type_: str, **fields: Any) -> bytes:
        payload = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {type_}\ndata: {json.dumps(payload)}\n\n".encode()

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.draft.item_id, "output_index": 0, "content_index": 0}

    def opening(self) -> bytes:
        pending = self.draft.response(done=False)
        return self._event("response.created", response=pending) + self._event("response.in_progress",
                                                                               response=pending)

    def delta(self, step: int) -> bytes:
        out = b""
        if step == 0:
            out += self._event("response.output_item.added", output_index=0, item=self.draft.message(done=False))
            out += self._event("response.content_part.added", **self._at(), part=self.draft.part(""))
        return out + self._event("response.output_text.delta", **self._at(), delta=self.draft.tokens[step],
                                 logprobs=[])

    def closing(self) -> bytes:
        text = self.draft.text()
        return b"".join((
            self._event("response.output_text.done", **self._at(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._at(), part=self.draft.part(text)),
            self._event("response.output_item.done", output_index=0, item=self.draft.message(done=True)),
            self._event("response.completed", response=self.draft.response(done=True)),
        ))
