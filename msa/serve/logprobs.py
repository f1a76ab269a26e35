"""Token logprobs in OpenAI's two shapes: chat (``logprobs.content`` entries with ``top_logprobs``)
and legacy completions (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

Every generated token gets an entry, the stop token included, so a choice has as many entries as
it counts completion tokens.

A token reads as vLLM's do: ``token`` is the token decoded alone (special tokens as their text), so
a token holding only part of a UTF-8 character reads as U+FFFD. A chat entry's ``bytes`` are the
bytes the token stands for (``Tokenizer.token_bytes``), the raw ones for such a token, so that the
``bytes`` of a reply's tokens joined decode to its text. A legacy ``text_offset`` is where, in the
choice's text, the character holding the token's first byte begins: the token's own text for a
token of whole characters, and for one that completes a character started by earlier tokens where
that character begins.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Protocol

from msa.cluster.protocol import TokenOutput


class TokenPieces(Protocol):
    """How tokens read (``OpenAIServer`` answers both)."""

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes: ...


def _top(out: TokenOutput, i: int, limit: int) -> list[tuple[int, float]]:
    if not out.top_logprobs or limit <= 0:
        return []
    ranked = sorted(out.top_logprobs[i].items(), key=lambda kv: -kv[1])
    return ranked[:limit]


def _chat_entry(pieces: TokenPieces, token: int, logprob: float) -> dict:
    return {"token": pieces.token_text(token), "logprob": logprob, "bytes": list(pieces.token_bytes(token))}


def chat_entries(out: TokenOutput, top_n: int, pieces: TokenPieces) -> list[dict]:
    """``logprobs.content`` entries for the tokens of one output."""
    return [
        _chat_entry(pieces, token, out.logprobs[i])
        | {"top_logprobs": [_chat_entry(pieces, t, lp) for t, lp in _top(out, i, top_n)]}
        for i, token in enumerate(out.token_ids)
    ]


def _utf8_decoder() -> codecs.IncrementalDecoder:
    # Bytes that cannot be read become U+FFFD as the tokenizer's decoding makes them: one for each
    # maximal invalid part.
    return codecs.getincrementaldecoder("utf-8")("replace")


@dataclass(slots=True)
class LegacyLogprobs:
    """Completions-style logprobs of one choice, grown output by output. ``skip_special_tokens`` is
    the request's: whether special tokens are left out of the text, so take no place in it."""

    top_n: int
    skip_special_tokens: bool = True
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    # The tokens' bytes so far as text: its whole characters counted, the bytes of a character
    # still incomplete held in the decoder.
    _chars: int = 0
    _decoder: codecs.IncrementalDecoder = field(default_factory=_utf8_decoder)
    _text_length: int = 0

    def _offset(self, raw: bytes) -> int:
        """Where the character holding ``raw``'s first byte begins. The held bytes and that byte
        read as the characters before it and that character (one U+FFFD for the held bytes if the
        byte does not continue them). A token that adds no bytes (a skipped special token) stands
        at the end of the whole characters so far."""
        if not raw:
            return self._chars
        held = self._decoder.getstate()[0]
        return self._chars + len((held + raw[:1]).decode("utf-8", "replace")) - 1

    def add(self, out: TokenOutput, pieces: TokenPieces) -> dict:
        """Record the output's tokens; return just their part (a streamed chunk's logprobs)."""
        start = len(self.tokens)
        for i, token in enumerate(out.token_ids):
            text = pieces.token_text(token)
            self.tokens.append(text)
            self.token_logprobs.append(out.logprobs[i])
            # As OpenAI's: the sampled token and up to top_n alternatives, keyed by text. Texts
            # can collide (byte tokens all decode to "\ufffd"); the sampled token's entry stays its
            # own and among alternatives the likelier wins (they come most likely first).
            top = {text: out.logprobs[i]}
            for alternative, lp in _top(out, i, self.top_n):
                top.setdefault(pieces.token_text(alternative), lp)
            self.top_logprobs.append(top)
            raw = pieces.token_bytes(token, self.skip_special_tokens)
            self.text_offset.append(self._offset(raw))
            self._chars += len(self._decoder.decode(raw))
        self._text_length += len(out.text)
        if out.finish_reason is not None:
            # The text may end short of the tokens (a stop string cut off, a stop token left out):
            # no offset points past it. Chunks streamed before the last are as they went out.
            self.text_offset = [min(at, self._text_length) for at in self.text_offset]
        return self.as_dict(start)

    def as_dict(self, start: int = 0) -> dict:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }
