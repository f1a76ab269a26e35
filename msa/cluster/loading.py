"""How a shard gets its weights: only its tensor-parallel slices, straight onto its device.

From a checkpoint directory the model is built on the meta device, cut to this rank's heads,
columns and experts (``apply_tensor_parallel``), and each tensor is read from the safetensors
files as just this rank's part (``tensor_part``): no rank reads, or holds, the full model.
A preset or ``ModelConfig`` gets seeded random weights drawn one of two ways:

- ``"cpu"``: the whole model in fp32 on the CPU after ``torch.manual_seed(seed)``, then sliced and
  moved: the same values as ``msa.platform.checkpoint.load_model`` gives on any device;
- ``"device"``: tensor by tensor, in the target dtype, on the shard's device from a generator
  seeded with ``seed``; every rank draws every full tensor in the same order and keeps its part,
  so the ranks agree. Much faster for large models (benchmarks); other values than ``"cpu"``.

Either way the MoE layers' experts end up stacked for grouped inference (``stack_experts``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from msa.cluster.parallel import ParallelGroups, apply_tensor_parallel, tensor_part
from msa.model.layers import SparseMoE
from msa.model.model import MiniMaxM3ForCausalLM, init_parameter_
from msa.platform.checkpoint import cast_model, keeps_fp32, load_checkpoint, place_tensor
from msa.platform.config import ModelConfig, load_config, model_config_of

RANDOM_INIT = ("cpu", "device")


def load_shard_model(
    source: str | Path | ModelConfig,
    groups: ParallelGroups,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    random_init: str = "cpu",
) -> MiniMaxM3ForCausalLM:
    """This rank's model (eval mode, without MTP modules) from a checkpoint directory, a preset
    name or a ModelConfig (random weights, drawn as ``random_init`` says)."""
    if random_init not in RANDOM_INIT:
        raise ValueError(f"random_init must be one of {RANDOM_INIT}, got {random_init!r}")
    if isinstance(source, ModelConfig) or not Path(source).is_dir():
        config = model_config_of(source)
        if random_init == "cpu":
            torch.manual_seed(seed)
            full = cast_model(MiniMaxM3ForCausalLM(config), dtype=dtype, device="cpu")
            model = apply_tensor_parallel(full, groups).to(device)
        else:
            model = _random_on_device(config, groups, dtype, device, seed)
    else:
        model = _meta_shard(load_config(source), groups)
        # Every tensor of this rank is checked to be in the files before any is read.
        part = lambda name: tensor_part(name, groups.tp_rank, groups.tp, model.config)
        load_checkpoint(model, source, dtype=dtype, device=device, progress=False, part=part)
    for module in model.modules():
        if isinstance(module, SparseMoE):
            module.stack_experts()
    return model.eval()


def _meta_shard(config: ModelConfig, groups: ParallelGroups) -> MiniMaxM3ForCausalLM:
    """This rank's model on the meta device: its shapes, no storage."""
    with torch.device("meta"):
        model = MiniMaxM3ForCausalLM(config)
    return apply_tensor_parallel(model, groups)


@torch.no_grad()
def _random_on_device(
    config: ModelConfig, groups: ParallelGroups, dtype: torch.dtype, device: torch.device, seed: int
) -> MiniMaxM3ForCausalLM:
    with torch.device("meta"):
        full = MiniMaxM3ForCausalLM(config)
    shapes = [(name, p.shape) for name, p in full.named_parameters()]
    del full
    model = _meta_shard(config, groups)
    generator = torch.Generator(device).manual_seed(seed)
    for name, shape in shapes:
        value = torch.empty(shape, dtype=torch.float32 if keeps_fp32(name) else dtype, device=device)
        init_parameter_(name, value, generator=generator)
        part = tensor_part(name, groups.tp_rank, groups.tp, config)
        if part is not None:
            place_tensor(model, part.name, part.take(value).clone(), dtype, device)
    return model
