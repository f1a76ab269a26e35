"""Turning one choice's sampled tokens into streamed outputs: detokenization, stop ids, stop
strings (text held back while it may still grow into one), max_tokens."""

from __future__ import annotations

from msa.cluster.protocol import SamplingParams, TokenOutput
from msa.platform.tokenizer import Tokenizer


class ChoiceStream:
    """Output state of choice ``index`` of a request."""

    def __init__(
        self,
        request_id: str,
        index: int,
        num_prompt_tokens: int,
        params: SamplingParams,
        tokenizer: Tokenizer,
        eos_token_ids: list[int],
    ) -> None:
        self.request_id, self.index, self.num_prompt_tokens = request_id, index, num_prompt_tokens
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self._decoder = tokenizer.stream_decoder(params.skip_special_tokens)
        self._text = ""
        self._emitted = 0
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _find_stop(self, start: int) -> tuple[int, int]:
        """Where the first stop string from ``start`` on begins and ends; (-1, -1) if none."""
        hits = [(at, at + len(s)) for s in self.params.stop if (at := self._text.find(s, start)) >= 0]
        return min(hits, default=(-1, -1))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(self._text)), best, -1):
                if self._text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def append(
        self, token: int, logprob: float, top: dict[int, float] | None, weight_version: int
    ) -> TokenOutput:
        """Record one sampled token and return the output to stream for it."""
        self.num_tokens += 1
        longest_stop = max((len(s) for s in self.params.stop), default=0)
        search_from = max(0, self._emitted - longest_stop + 1)
        stop_id = token in self.stop_ids
        if stop_id:
            self.finish_reason = "stop"
        if not stop_id or self.params.include_stop_str_in_output:
            self._text += self._decoder.feed(token)
        if not stop_id and self.num_tokens >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finished:
            # The bytes of a character the choice ended inside read as U+FFFD, as in decode(); a
            # stop string found below still cuts them off.
            self._text += self._decoder.flush()
        end = len(self._text)
        if self.params.stop:
            hit, hit_end = self._find_stop(search_from)
            if hit >= 0:
                end = hit_end if self.params.include_stop_str_in_output else hit
                self._text, self.finish_reason = self._text[:end], "stop"
            elif not self.finished:
                end -= self._held_back()
        if self.finish_reason == "stop" and stop_id:
            end = len(self._text)
        text, self._emitted = self._text[self._emitted : end], max(self._emitted, end)
        return TokenOutput(
            request_id=self.request_id,
            index=self.index,
            token_ids=[token],
            logprobs=[logprob],
            top_logprobs=None if self.params.logprobs is None else [top or {}],
            text=text,
            finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            weight_version=weight_version,
        )

    def abort(self, weight_version: int) -> TokenOutput:
        """The closing output of a cancelled choice."""
        self.finish_reason = "abort"
        return TokenOutput(
            request_id=self.request_id,
            index=self.index,
            token_ids=[],
            logprobs=[],
            top_logprobs=None if self.params.logprobs is None else [],
            text="",
            finish_reason="abort",
            num_prompt_tokens=self.num_prompt_tokens,
            weight_version=weight_version,
        )
