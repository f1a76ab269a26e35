"""Token-level bookkeeping of a multi-turn conversation rendered by a chat template.

The model's own tokens are kept exactly as sampled (never re-tokenized from text), and the text
the template puts around them (the end of the assistant turn, tool results, the next assistant
header) is derived from the template by rendering with and without it, so any template works.
"""

from __future__ import annotations

from typing import Any

from msa.platform.tokenizer import Tokenizer

_MARK = "\x00msa-reply\x00"
_PROBE = [{"role": "user", "content": "probe"}]


class ChatTokens:
    """Renders prompts and the masked glue between turns for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = set(tokenizer.eos_token_ids)
        closed = tokenizer.apply_chat_template(
            _PROBE + [{"role": "assistant", "content": _MARK}], add_generation_prompt=False
        )
        self._closed_probe = closed
        self.turn_end = closed.split(_MARK, 1)[1]

    def prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def reply_text(self, reply_ids: list[int]) -> str:
        """What the environment reads: the reply with special tokens kept, a final stop token dropped."""
        if reply_ids and reply_ids[-1] in self.stop_token_ids:
            reply_ids = reply_ids[:-1]
        return self.tokenizer.decode(reply_ids, skip_special_tokens=False)

    def glue_ids(self, reply_ids: list[int], observations: list[dict[str, Any]]) -> list[int]:
        """Tokens after a reply: the rest of the assistant turn's closing (the part its stop token did
        not already write), the observation turns and the next assistant header. Never trained on."""
        closing = self.turn_end
        if reply_ids and reply_ids[-1] in self.stop_token_ids:
            stop_text = self.tokenizer.decode([reply_ids[-1]], skip_special_tokens=False)
            if closing.startswith(stop_text):
                closing = closing[len(stop_text) :]
        rendered = self.tokenizer.apply_chat_template(
            _PROBE + [{"role": "assistant", "content": _MARK}] + observations, add_generation_prompt=True
        )
        if not rendered.startswith(self._closed_probe):
            raise ValueError(
                "the chat template renders earlier turns differently once observations follow; "
                "turn-by-turn token bookkeeping needs a prefix-stable template"
            )
        return self.tokenizer.encode(closing + rendered[len(self._closed_probe) :])
