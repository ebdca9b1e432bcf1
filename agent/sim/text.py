"""Deterministic fake text, token counting and embeddings for the sim engine (pure functions)."""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

_SENTENCE = (
    "the pool serves every model through one endpoint while idle accelerators join and leave "
    "with their jobs so researchers call models instead of building environments and waiting "
    "for queues a planner places replicas where they cost least and gateways route requests "
    "to healthy instances streaming tokens back as they are generated"
)
WORDS = _SENTENCE.split()


def seed_for(*parts: object) -> int:
    """A stable 64-bit seed from the request's content (same prompt, same text)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def token_stream(seed: int, count: int) -> list[str]:
    """``count`` pieces of text, one per token, each a word with a leading space after the first."""
    rng = random.Random(seed)
    return [(" " if i else "") + rng.choice(WORDS) for i in range(count)]


def count_tokens(text: str) -> int:
    """Rough token count: whitespace-separated pieces (at least 1 for non-empty text)."""
    return max(1, len(text.split())) if text else 0


def prompt_text(value: Any) -> str:
    """Flatten a completions ``prompt`` or a chat ``messages`` list into text for counting."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts: list[str] = []
        for item in value:
            if isinstance(item, dict):
                content = item.get("content")
                parts.append(prompt_text(content) if not isinstance(content, str) else content)
                if isinstance(item.get("text"), str):
                    parts.append(item["text"])
            elif isinstance(item, int):
                parts.append("t")  # a token id
            else:
                parts.append(prompt_text(item))
        return " ".join(p for p in parts if p)
    return str(value)


def embedding(text: str, dim: int) -> list[float]:
    """A unit vector determined by ``text``."""
    rng = random.Random(seed_for("embed", text))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def relevance(query: str, document: str, dim: int) -> float:
    """A score in [0, 1] for a (query, document) pair: the cosine of their embeddings, mapped to [0, 1].

    Identical texts score 1.0 (rounded to 6 places, so float noise does not show); the score is
    symmetric and depends on nothing but the two texts.
    """
    cosine = math.fsum(a * b for a, b in zip(embedding(query, dim), embedding(document, dim), strict=True))
    return round(min(1.0, max(0.0, (1.0 + cosine) / 2)), 6)
