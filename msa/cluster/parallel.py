"""Parallelism applied to the plain model from outside: tensor-parallel slicing and all-reduces,
expert parallelism, and the context-parallel (sequence-sharded KV) collectives.

Rank layout of a ``tp x sp`` replica: global rank ``sp_rank * tp + tp_rank``. A tensor-parallel
group is the ``tp`` ranks of one sequence shard; a context-parallel group is the ``sp`` ranks that
hold the same heads. Tensor parallelism splits query/KV/index heads (index head g serves KV head g,
so they move together), the dense and shared-expert MLP columns, and places the routed experts
round a contiguous range per rank; o_proj, the dense MLP and the MoE block then end in an
all-reduce. Embedding, lm_head, norms, the router and the (single, shared) index key are replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from msa.cluster.protocol import WeightUpdateError
from msa.model.model import MiniMaxM3ForCausalLM
from msa.platform.checkpoint import TensorPart
from msa.platform.config import ConfigError, ModelConfig

# Parameter name (suffix) -> dimension split across tensor-parallel ranks.
_SPLIT_DIM = {
    r"self_attn\.(q_proj|k_proj|v_proj|index_q_proj)\.weight$": 0,
    r"self_attn\.o_proj\.weight$": 1,
    r"(mlp|shared_experts)\.(gate_proj|up_proj)\.weight$": 0,
    r"(mlp|shared_experts)\.down_proj\.weight$": 1,
}
_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")


def check_parallel_shape(config: ModelConfig, tp: int) -> None:
    """Raise ConfigError unless ``tp`` splits heads, index heads and experts evenly."""
    for name, count in (
        ("num_key_value_heads", config.num_key_value_heads),
        ("num_local_experts", config.num_local_experts),
        ("intermediate_size", config.intermediate_size),
        ("shared_intermediate_size", config.shared_intermediate_size),
    ):
        if count % tp:
            raise ConfigError(f"tp={tp} must divide the model's {name} ({count})")


def engine_runs(name: str) -> bool:
    """Whether some shard of the engine holds (part of) the checkpoint tensor ``name``: all but
    the MTP modules, which the engine does not run."""
    return not name.startswith("model.mtp.")


def tensor_part(name: str, tp_rank: int, tp: int, config: ModelConfig) -> TensorPart | None:
    """Which part of the full checkpoint tensor ``name`` tensor-parallel rank ``tp_rank`` holds,
    under the name it has in that rank's model; None when the rank holds none of it (another
    rank's expert, or an MTP module, which the engine does not run)."""
    if not engine_runs(name):
        return None
    expert = _EXPERT.match(name)
    if expert:
        per_rank = config.num_local_experts // tp
        local = int(expert.group(2)) - tp_rank * per_rank
        if not 0 <= local < per_rank:
            return None
        return TensorPart(f"{expert.group(1)}{local}{expert.group(3)}")
    for pattern, dim in _SPLIT_DIM.items():
        if re.search(pattern, name):
            return TensorPart(name, dim=dim, index=tp_rank, count=tp)
    return TensorPart(name)


def shard_tensor(
    name: str, full: torch.Tensor, tp_rank: int, tp: int, config: ModelConfig
) -> tuple[str, torch.Tensor] | None:
    """The slice of a full checkpoint tensor that tensor-parallel rank ``tp_rank`` holds (a view),
    under the name it has in that rank's model; None when it holds none (see ``tensor_part``)."""
    part = tensor_part(name, tp_rank, tp, config)
    return None if part is None else (part.name, part.take(full))


@dataclass
class ParallelGroups:
    """This rank's place in the replica and its process groups (None when that size is 1)."""

    tp_rank: int
    tp: int
    sp_rank: int
    sp: int
    tp_group: object | None = None
    cp_group: object | None = None

    @property
    def rank(self) -> int:
        return self.sp_rank * self.tp + self.tp_rank


def init_parallel_groups(
    rank: int, tp: int, sp: int, port: int, backend: str, timeout_s: float
) -> ParallelGroups:
    """Join the replica's process group over a TCP store on 127.0.0.1:``port`` (all shards of a
    replica share one node) and create every tensor- and context-parallel group."""
    groups = ParallelGroups(tp_rank=rank % tp, tp=tp, sp_rank=rank // tp, sp=sp)
    if tp * sp == 1:
        return groups
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=tp * sp,
        timeout=timedelta(seconds=timeout_s),
    )
    for s in range(sp):  # every rank must create every group, in the same order
        group = dist.new_group([s * tp + t for t in range(tp)]) if tp > 1 else None
        if s == groups.sp_rank:
            groups.tp_group = group
    for t in range(tp):
        group = dist.new_group([s * tp + t for s in range(sp)]) if sp > 1 else None
        if t == groups.tp_rank:
            groups.cp_group = group
    return groups


def _all_reduce_hook(group: object):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    return hook


@torch.no_grad()
def apply_tensor_parallel(model: MiniMaxM3ForCausalLM, groups: ParallelGroups) -> MiniMaxM3ForCausalLM:
    """Cut a full model in place down to this rank's heads, columns and experts (through
    ``shard_tensor``, as weight updates are) and add the all-reduces; drops the MTP modules."""
    config = model.config
    if hasattr(model.model, "mtp"):
        del model.model.mtp
    if groups.tp == 1:
        return model
    check_parallel_shape(config, groups.tp)
    full = {name: p.detach() for name, p in model.named_parameters()}
    per_rank = config.num_local_experts // groups.tp
    for layer in model.model.layers:
        moe = getattr(layer, "block_sparse_moe", None)
        if moe is not None:
            start = groups.tp_rank * per_rank
            moe.experts = nn.ModuleList(list(moe.experts)[start : start + per_rank])
            moe.expert_offset = start
    params = dict(model.named_parameters())
    for name, tensor in full.items():
        piece = shard_tensor(name, tensor, groups.tp_rank, groups.tp, config)
        if piece is not None:
            params[piece[0]].data = piece[1].clone()
    hook = _all_reduce_hook(groups.tp_group)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(hook)
        layer.feed_forward.register_forward_hook(hook)
    return model


def slice_for_rank(
    model: MiniMaxM3ForCausalLM, named_tensors: list[tuple[str, torch.Tensor]], groups: ParallelGroups
) -> list[tuple[str, torch.Tensor]]:
    """This rank's slices of full (unsharded) tensors given by state_dict name, under the names
    they have in this rank's model, each checked against the parameter it will replace.
    Raises WeightUpdateError naming the first unknown or misshapen tensor."""
    params = dict(model.named_parameters())
    out = []
    for name, tensor in named_tensors:
        piece = shard_tensor(name, tensor, groups.tp_rank, groups.tp, model.config)
        if piece is None:
            continue
        local, value = piece
        if local not in params:
            raise WeightUpdateError(f"weight update names an unknown tensor {name!r}")
        if params[local].shape != value.shape:
            raise WeightUpdateError(
                f"weight update tensor {name!r} of shape {tuple(tensor.shape)} gives "
                f"this rank a slice {tuple(value.shape)}, but the model holds "
                f"{tuple(params[local].shape)}"
            )
        out.append((local, value))
    return out


class ContextParallelGroup:
    """``msa.model.kv_cache.ContextParallel`` over a torch.distributed group: stacks every
    sequence shard's block candidates and partial attention, in shard order."""

    def __init__(self, group: object, world: int) -> None:
        self.group, self.world = group, world

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts)

    def gather_block_candidates(
        self, ids: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather(ids), self._gather(scores)

    def gather_attention(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather(out), self._gather(lse)
