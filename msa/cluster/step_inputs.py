"""A shard's inputs for one step: a ``StepPlan`` turned into the ``AttentionBatch``, token ids and
sampled rows on the shard's device.

The block table stays on the device between steps, one row per sequence (``BlockManager`` assigns
the rows); a step writes only the entries its plan adds. What else a step needs (positions, the
cache slots of the new tokens, query offsets, lengths, which rows to sample) is computed on the
host with numpy from the plan and a host copy of the table, and reaches the device in two copies
(int64 and int32) that do not wait for the device (``msa.cluster.transfer``). Nothing is read
back from the device, so building a step never waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from msa.cluster.block_manager import PageTableUpdate
from msa.cluster.scheduler import StepPlan
from msa.cluster.transfer import to_device
from msa.model.kv_cache import AttentionBatch, ContextParallel, PagedKVCache


@dataclass(slots=True)
class StepInputs:
    """What the model runs on in one step: ``token_ids [T]`` int64, the batch, and ``sample_rows
    [S]`` int64 (the token row of each entry of ``plan.samples``)."""

    token_ids: torch.Tensor
    batch: AttentionBatch
    sample_rows: torch.Tensor


class BlockTable:
    """This shard's page ids ``[rows, cols]`` int32 on the device, mirrored on the host. Grows (by
    doubling) when an update names a row or column past its size; stale entries of a row past its
    sequence's pages are never read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = np.zeros((0, 0), dtype=np.int32)
        self.table = torch.zeros((0, 0), dtype=torch.int32, device=device)

    def ensure(self, rows: int, cols: int) -> None:
        """Room for at least ``rows`` x ``cols`` entries."""
        old_rows, old_cols = self.host.shape
        if rows <= old_rows and cols <= old_cols:
            return
        new_rows = max(rows, 2 * old_rows, 8) if rows > old_rows else old_rows
        new_cols = max(cols, 2 * old_cols, 16) if cols > old_cols else old_cols
        host = np.zeros((new_rows, new_cols), dtype=np.int32)
        host[:old_rows, :old_cols] = self.host
        table = torch.zeros((new_rows, new_cols), dtype=torch.int32, device=self.device)
        table[:old_rows, :old_cols] = self.table
        self.host, self.table = host, table

    def apply_host(self, update: PageTableUpdate, rows_in_step: np.ndarray) -> None:
        """Write ``update`` into the host copy (growing both copies to fit it and the step's rows)."""
        max_row = max(update.rows, default=-1)
        if rows_in_step.size:
            max_row = max(max_row, int(rows_in_step.max()))
        self.ensure(max_row + 1, max(update.cols, default=0) + 1)
        if len(update):
            self.host[update.rows, update.cols] = update.pages

    def apply_device(self, rows: torch.Tensor, cols: torch.Tensor, pages: torch.Tensor) -> None:
        """The same update on the device copy, from its (uploaded) rows, columns and pages."""
        if pages.numel():
            self.table.index_put_((rows, cols), pages)

    def rows(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """The first ``width`` entries of the given rows: ``[len(rows), width]`` int32, contiguous."""
        return self.table[:, :width].index_select(0, rows)


class StepInputBuilder:
    """Builds each step's ``StepInputs`` for sequence shard ``shard_rank`` of ``shard_world``."""

    def __init__(
        self,
        device: torch.device,
        block_size: int,
        shard_rank: int,
        shard_world: int,
    ) -> None:
        self.device, self.block_size = device, block_size
        self.shard_rank, self.shard_world = shard_rank, shard_world
        self.tables = BlockTable(device)

    def build(
        self, plan: StepPlan, cache: PagedKVCache, context_parallel: ContextParallel | None = None
    ) -> StepInputs:
        """This shard's inputs for ``plan``; first brings its block table up to date."""
        update = plan.table_updates[self.shard_rank]
        rows = np.asarray(plan.table_rows, dtype=np.int64)
        self.tables.apply_host(update, rows)
        cached = np.asarray(plan.num_cached, dtype=np.int64)
        new = np.asarray(plan.num_new, dtype=np.int64)
        cu = np.zeros(len(new) + 1, dtype=np.int64)
        np.cumsum(new, out=cu[1:])
        positions, slots = self._positions_and_slots(rows, cached, new, cu)
        seq_lens = cached + new
        width = self._width(seq_lens)
        sample_rows = cu[1:][[s.row for s in plan.samples]] - 1
        ids, positions, slots, rows, sample_rows, upd_rows, upd_cols = _upload(
            [plan.token_ids, positions, slots, rows, sample_rows, update.rows, update.cols],
            np.int64,
            self.device,
        )
        cu_t, seq_lens_t, upd_pages = _upload([cu, seq_lens, update.pages], np.int32, self.device)
        self.tables.apply_device(upd_rows, upd_cols, upd_pages)
        batch = AttentionBatch(
            positions=positions,
            cu_seqlens_q=cu_t,
            seq_lens=seq_lens_t,
            block_table=self.tables.rows(rows, width),
            slot_mapping=slots,
            block_size=self.block_size,
            cache=cache,
            shard_rank=self.shard_rank,
            shard_world=self.shard_world,
            context_parallel=context_parallel,
            max_q_len=int(new.max(initial=0)),
            max_seq_len=int(seq_lens.max(initial=0)),
            dense_attention=plan.dense_attention,
        )
        return StepInputs(token_ids=ids, batch=batch, sample_rows=sample_rows)

    def _positions_and_slots(
        self, rows: np.ndarray, cached: np.ndarray, new: np.ndarray, cu: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Global position of every new token and its flat cache slot on this shard (-1 when its
        block lives on another shard)."""
        bs, world = self.block_size, self.shard_world
        owner = np.repeat(np.arange(len(new)), new)  # the sequence of each token row
        positions = np.arange(cu[-1], dtype=np.int64) - cu[:-1][owner] + cached[owner]
        block = positions // bs
        col = np.minimum(block // world, self.tables.host.shape[1] - 1)
        pages = self.tables.host[rows[owner], col].astype(np.int64)
        return positions, np.where(block % world == self.shard_rank, pages * bs + positions % bs, -1)

    def _width(self, seq_lens: np.ndarray) -> int:
        """Block-table columns this step reads: the most blocks one of its sequences has here."""
        bs, rank, world = self.block_size, self.shard_rank, self.shard_world
        local = np.maximum(0, ((seq_lens + bs - 1) // bs - rank + world - 1) // world)
        width = max(1, int(local.max(initial=0)))
        self.tables.ensure(0, width)
        return width


# Each uploaded array starts on a 16-byte boundary of the shared buffer. Triton compiles a kernel
# per alignment of its pointer arguments, so an offset that shifted with the step's sizes would
# make the same kernel compile again mid-serving (and the warm-up's copies would not match).
_UPLOAD_ALIGN = 16


def _upload(parts: list, dtype: type, device: torch.device) -> list[torch.Tensor]:
    """Concatenate host arrays (or int lists), copy them to ``device`` at once, split them again;
    every array starts 16-byte aligned."""
    arrays = [np.asarray(p, dtype=dtype).ravel() for p in parts]
    step = _UPLOAD_ALIGN // np.dtype(dtype).itemsize
    spans = [-(-a.size // step) * step for a in arrays]
    whole = np.zeros(sum(spans), dtype=dtype)
    starts = np.cumsum([0, *spans[:-1]])
    for start, a in zip(starts, arrays, strict=True):
        whole[start : start + a.size] = a
    device_whole = to_device(whole, device)
    return [device_whole[start : start + a.size] for start, a in zip(starts, arrays, strict=True)]
