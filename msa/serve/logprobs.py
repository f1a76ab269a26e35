"""Token logprobs in OpenAI's two shapes: chat (``logprobs.content`` entries with ``top_logprobs``)
and legacy completions (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

Every generated token gets an entry, the stop token included, so a choice has as many entries as
it counts completion tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from msa.cluster.protocol import TokenOutput

TokenText = Callable[[int], str]


def _top(out: TokenOutput, i: int, limit: int) -> list[tuple[int, float]]:
    if not out.top_logprobs or limit <= 0:
        return []
    ranked = sorted(out.top_logprobs[i].items(), key=lambda kv: -kv[1])
    return ranked[:limit]


def chat_entries(out: TokenOutput, top_n: int, token_text: TokenText) -> list[dict]:
    """``logprobs.content`` entries for the tokens of one output."""
    entries = []
    for i, token in enumerate(out.token_ids):
        text = token_text(token)
        alternatives = [
            {"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())}
            for t, lp in _top(out, i, top_n)
        ]
        entries.append(
            {
                "token": text,
                "logprob": out.logprobs[i],
                "bytes": list(text.encode()),
                "top_logprobs": alternatives,
            }
        )
    return entries


@dataclass(slots=True)
class LegacyLogprobs:
    """Completions-style logprobs of one choice, grown output by output."""

    top_n: int
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    _offset: int = 0

    def add(self, out: TokenOutput, token_text: TokenText) -> dict:
        """Record the output's tokens; return just their part (a streamed chunk's logprobs)."""
        start = len(self.tokens)
        for i, token in enumerate(out.token_ids):
            text = token_text(token)
            self.tokens.append(text)
            self.token_logprobs.append(out.logprobs[i])
            # As OpenAI's: the sampled token and up to top_n alternatives, keyed by text. Texts
            # can collide (byte tokens all decode to "\ufffd"); the sampled token's entry stays its
            # own and among alternatives the likelier wins (they come most likely first).
            top = {text: out.logprobs[i]}
            for alternative, lp in _top(out, i, self.top_n):
                top.setdefault(token_text(alternative), lp)
            self.top_logprobs.append(top)
            self.text_offset.append(self._offset)
            self._offset += len(text)
        return self.as_dict(start)

    def as_dict(self, start: int = 0) -> dict:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }
