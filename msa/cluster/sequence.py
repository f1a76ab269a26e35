"""One generated choice of a request, as the scheduler and block manager see it."""

from __future__ import annotations

import enum
import itertools

from msa.cluster.protocol import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt plus generated tokens of one choice, how many of them are in the KV cache, and the
    pages holding them (one page list per sequence shard: global block j is entry ``j // sp`` of
    shard ``j % sp``).

    Each step computes ``token_ids[num_cached:num_cached + chunk]``; when that reaches the end,
    the last row's logits give the next token. A preempted sequence drops its pages and
    ``num_cached`` goes back to 0, so it is recomputed (prompt and output alike) when readmitted.
    """

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        sp: int,
        prefix_source: Sequence | None = None,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id, self.index = request_id, index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params, self.seed = params, seed
        self.num_cached = 0
        self.status = SequenceStatus.WAITING
        self.pages: list[list[int]] = [[] for _ in range(sp)]
        # The row of the shards' block tables that holds this sequence's pages while it holds any,
        # and how many of each shard's pages the shards have been sent (see BlockManager).
        self.table_row: int | None = None
        self.pages_sent: list[int] = [0] * sp
        self.num_preemptions = 0
        # Another choice of the same request whose cached prompt blocks this one may share.
        self.prefix_source = prefix_source

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_cached

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def shareable_prompt_blocks(self, block_size: int) -> int:
        """Full prompt blocks another choice can share; at least one prompt token stays
        uncomputed so this sequence still gets logits to sample from."""
        return (self.num_prompt_tokens - 1) // block_size

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}/{self.index}, "
            f"tokens={self.num_tokens}, cached={self.num_cached}, {self.status.value})"
        )
