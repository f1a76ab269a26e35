"""Checkpoint I/O: safetensors weights read into a module by name, written back in the same names.

Two layouts are read and written: the flat text-only one (tensor names equal the module's
``state_dict`` keys) and the vision-language one (``language_model.`` + key, with the vision
tensors beside them, which a text model skips). Loading goes tensor by tensor, so host memory
never holds a second full copy of the weights.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from msa.platform.config import ModelConfig, load_config, model_config_of

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
VL_PREFIX = "language_model."
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
# The MoE router runs in fp32 and its weights are stored in fp32, whatever the rest of the model uses.
FP32_SUFFIXES = ("block_sparse_moe.gate.weight", "block_sparse_moe.e_score_correction_bias")
_SHOWN_PER_KIND = 20


class CheckpointError(ValueError):
    """The checkpoint does not fit the model. ``missing``, ``unexpected`` and ``misshaped`` list every
    offending tensor as (name in the files, expected shape or None, found shape or None);
    ``mistyped`` as (name in the files, the dtype it would load as, its dtype in the file: "I32", ...)."""

    def __init__(
        self,
        message: str,
        *,
        missing: list | None = None,
        unexpected: list | None = None,
        misshaped: list | None = None,
        mistyped: list | None = None,
    ) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.misshaped = missing or [], unexpected or [], misshaped or []
        self.mistyped = mistyped or []


def keeps_fp32(name: str) -> bool:
    """Whether the tensor ``name`` stays fp32 when the model is cast to a lower precision."""
    return name.endswith(FP32_SUFFIXES)


@dataclass(frozen=True, slots=True)
class TensorPart:
    """Which part of a checkpoint tensor a model holds, and under which module key: chunk ``index``
    of ``count`` equal chunks along ``dim`` (the whole tensor when ``count`` is 1). How a
    tensor-parallel rank loads only its slices."""

    name: str
    dim: int = 0
    index: int = 0
    count: int = 1

    def bounds(self, size: int) -> tuple[int, int]:
        if size % self.count:
            raise CheckpointError(
                f"'{self.name}': dim {self.dim} of size {size} does not split into {self.count} equal parts"
            )
        step = size // self.count
        return self.index * step, (self.index + 1) * step

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        """The part's shape, given the full tensor's."""
        if self.count == 1:
            return tuple(full)
        start, stop = self.bounds(full[self.dim])
        return (*full[: self.dim], stop - start, *full[self.dim + 1 :])

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The part of an in-memory full tensor (a view)."""
        if self.count == 1:
            return full
        start, stop = self.bounds(full.shape[self.dim])
        return full.narrow(self.dim, start, stop - start)

    def read(self, f: Any, checkpoint_name: str) -> torch.Tensor:
        """Read just the part from an open safetensors file."""
        if self.count == 1:
            return f.get_tensor(checkpoint_name)
        view = f.get_slice(checkpoint_name)
        start, stop = self.bounds(view.get_shape()[self.dim])
        return view[(slice(None),) * self.dim + (slice(start, stop),)]


# Reading -----------------------------------------------------------------------------------------


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    index = directory / INDEX_FILE
    if index.exists():
        return {name: directory / file for name, file in _weight_map(index).items()}
    single = directory / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _weight_map(index: Path) -> dict[str, str]:
    """The index file's tensor name -> shard file name."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index} is not valid JSON: {e}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
        raise CheckpointError(f"{index} has no 'weight_map' object of tensor name -> shard file")
    return weight_map


def _by_file(names: dict[str, Path]) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = defaultdict(list)
    for name, path in names.items():
        groups[path].append(name)
    return groups


def _tensor_headers(files: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and dtypes (safetensors' names: "BF16", "I32", ...) from the safetensors headers,
    without reading any tensor data. Rejects FP8 weights."""
    shapes, dtypes = {}, {}
    for path, names in _by_file(files).items():
        if not path.exists():
            raise FileNotFoundError(f"{INDEX_FILE} names shard {path.name}, which is not in {path.parent}")
        with safe_open(path, framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(
                        f"{INDEX_FILE} places tensor '{name}' in {path.name}, which lacks it"
                    )
                view = f.get_slice(name)
                if name.endswith("weight_scale_inv") or view.get_dtype().startswith("F8"):
                    raise CheckpointError(
                        f"FP8 block-scaled checkpoints are not supported yet: {path.parent} holds '{name}' "
                        f"({view.get_dtype()}); use a bf16 release of the weights"
                    )
                shapes[name] = tuple(view.get_shape())
                dtypes[name] = view.get_dtype()
    return shapes, dtypes


def _model_name(checkpoint_name: str) -> str | None:
    """The module's key for a checkpoint tensor, or None for a vision tensor the text model skips."""
    if checkpoint_name.startswith(VISION_PREFIXES):
        return None
    return checkpoint_name.removeprefix(VL_PREFIX)


def _names_in_model(checkpoint_names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """(module key -> checkpoint name, checkpoint names that repeat a key already taken)."""
    to_model: dict[str, str] = {}
    duplicates = []
    for ckpt_name in checkpoint_names:
        name = _model_name(ckpt_name)
        if name is None:
            continue
        if name in to_model:
            duplicates.append(ckpt_name)  # both the flat and the VL name of one tensor
        else:
            to_model[name] = ckpt_name
    return to_model, duplicates


def _mismatch_lines(kind: str, rows: list) -> list[str]:
    lines = [
        f"  {kind} {name}: expected {list(e) if e is not None else 'none'}, "
        f"found {list(f) if f is not None else 'none'}"
        for name, e, f in rows[:_SHOWN_PER_KIND]
    ]
    if len(rows) > _SHOWN_PER_KIND:
        lines.append(f"  ... and {len(rows) - _SHOWN_PER_KIND} more {kind} (see CheckpointError.{kind})")
    return lines


def _is_vl_layout(checkpoint_names: Iterable[str]) -> bool:
    """Whether most text tensors carry the ``language_model.`` prefix."""
    names = [n for n in checkpoint_names if _model_name(n) is not None]
    return 2 * sum(n.startswith(VL_PREFIX) for n in names) > len(names)


def _check_match(
    directory: Path,
    expected: dict[str, tuple],
    found: dict[str, tuple],
    duplicates: list[str],
    in_file: dict[str, str],
    prefix: str,
) -> None:
    """Compare by module key; report by the name in the files (``prefix`` + key for a missing one)."""
    missing = [(prefix + n, expected[n], None) for n in expected if n not in found]
    unexpected = [(in_file[n], None, found[n]) for n in found if n not in expected]
    unexpected += [(n, None, None) for n in duplicates]
    misshaped = [
        (in_file[n], expected[n], found[n]) for n in expected if n in found and expected[n] != found[n]
    ]
    if not (missing or unexpected or misshaped):
        return
    head = (
        f"checkpoint {directory} does not fit the model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(misshaped)} misshaped tensor(s)"
    )
    lines = (
        [head]
        + _mismatch_lines("missing", missing)
        + _mismatch_lines("unexpected", unexpected)
        + _mismatch_lines("misshaped", misshaped)
    )
    raise CheckpointError("\n".join(lines), missing=missing, unexpected=unexpected, misshaped=misshaped)


def _is_float_dtype(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith(("F", "BF"))


def _check_dtypes(
    directory: Path,
    state: dict[str, torch.Tensor],
    parts: dict[str, TensorPart],
    dtypes: dict[str, str],
    dtype: torch.dtype,
) -> None:
    """A floating parameter needs a floating tensor in the files (of any precision: it is
    converted), an integer or bool one a tensor that is not floating."""
    mistyped = []
    for ckpt, held in parts.items():
        current = state[held.name]
        if current.is_floating_point() != _is_float_dtype(dtypes[ckpt]):
            loaded_as = torch.float32 if keeps_fp32(held.name) else dtype
            mistyped.append((ckpt, loaded_as if current.is_floating_point() else current.dtype, dtypes[ckpt]))
    if not mistyped:
        return
    lines = [f"checkpoint {directory} has {len(mistyped)} tensor(s) of the wrong dtype"]
    lines += [
        f"  {name}: expected {'a floating dtype, loaded as ' if e.is_floating_point else ''}{e}, found {f}"
        for name, e, f in mistyped[:_SHOWN_PER_KIND]
    ]
    if len(mistyped) > _SHOWN_PER_KIND:
        lines.append(f"  ... and {len(mistyped) - _SHOWN_PER_KIND} more (see CheckpointError.mistyped)")
    raise CheckpointError("\n".join(lines), mistyped=mistyped)


def _same_device(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


@torch.no_grad()
def place_tensor(
    model: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> None:
    """Put ``value`` into the parameter or buffer ``name``: copied in place when it already has the
    target dtype and device, otherwise replaced by a converted tensor (the old one is freed).
    A floating tensor becomes ``dtype`` (fp32 if ``keeps_fp32``); an integer or bool one keeps the
    parameter's dtype. Raises CheckpointError when one kind is given for the other."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    is_param = leaf in owner._parameters
    current = owner._parameters[leaf] if is_param else owner._buffers[leaf]
    if value.is_floating_point() != current.is_floating_point():
        kind = "a floating" if current.is_floating_point() else f"a {current.dtype}"
        raise CheckpointError(f"'{name}': expected {kind} tensor, got {value.dtype}")
    if not value.is_floating_point():
        target = current.dtype
    else:
        target = torch.float32 if keeps_fp32(name) else dtype
    if not current.is_meta and current.dtype == target and _same_device(current, device):
        if value is not current:
            current.copy_(value)
    elif is_param:
        owner._parameters[leaf] = nn.Parameter(
            value.to(device=device, dtype=target), requires_grad=current.requires_grad
        )
    else:
        owner._buffers[leaf] = value.to(device=device, dtype=target)


def load_checkpoint(
    model: nn.Module,
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    part: Callable[[str], TensorPart | None] | None = None,
) -> None:
    """Fill ``model``'s parameters and buffers from the safetensors checkpoint in ``directory``.

    Floating tensors become ``dtype`` on ``device``, except the router's (``keeps_fp32``), which stay
    fp32. Every name/shape mismatch is checked from the file headers before any data is read and
    reported together in one ``CheckpointError``, by the names in the files; then so is every
    tensor whose dtype is not floating where the model's is (or the reverse). The model may be
    built on the meta device. ``part`` maps a full tensor's module key to the part this model
    holds (None: none of it); only that part is read from the files.
    """
    directory, device = Path(directory), torch.device(device)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    files = _tensor_files(directory)
    shapes, dtypes = _tensor_headers(files)
    to_model, duplicates = _names_in_model(files)
    parts: dict[str, TensorPart] = {}  # checkpoint name -> the part of it this model holds
    taken: set[str] = set()
    for name, ckpt in to_model.items():
        held = TensorPart(name) if part is None else part(name)
        if held is None:
            continue
        if held.name in taken:
            duplicates.append(ckpt)
        else:
            parts[ckpt] = held
            taken.add(held.name)
    state = model.state_dict(keep_vars=True)
    expected = {name: tuple(t.shape) for name, t in state.items()}
    found = {p.name: p.shape(shapes[ckpt]) for ckpt, p in parts.items()}
    in_file = {p.name: ckpt for ckpt, p in parts.items()}
    prefix = VL_PREFIX if _is_vl_layout(files) else ""
    _check_match(directory, expected, found, duplicates, in_file, prefix)
    _check_dtypes(directory, state, parts, dtypes, dtype)
    bar = tqdm(total=len(parts), desc=f"loading {directory.name}", unit="tensor", disable=not progress)
    with bar:
        for path, names in _by_file({ckpt: files[ckpt] for ckpt in parts}).items():
            with safe_open(path, framework="pt", device="cpu") as f:
                for ckpt in names:
                    place_tensor(model, parts[ckpt].name, parts[ckpt].read(f, ckpt), dtype, device)
                    bar.update()


def cast_model(model: nn.Module, *, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """Move ``model`` to ``device`` and cast its floating tensors to ``dtype``, keeping the router's
    tensors (``keeps_fp32``) in fp32. Tensor by tensor, like loading. Returns ``model``."""
    device = torch.device(device)
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        place_tensor(model, name, tensor, dtype, device)
    return model


# Writing -----------------------------------------------------------------------------------------


def _plan_shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _config_json(config: ModelConfig, layout: str) -> dict[str, Any]:
    text = config.to_dict()
    if layout == "flat":
        return {"architectures": ["MiniMaxM3ForCausalLM"], **text}
    return {"model_type": "minimax_m3_vl", "text_config": text}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(
    model: nn.Module,
    directory: str | Path,
    config: ModelConfig,
    *,
    max_shard_bytes: int = 5 * 2**30,
    layout: str = "flat",
) -> Path:
    """Write ``config.json`` and the module's ``state_dict`` as safetensors, in its own dtypes.

    One shard goes to ``model.safetensors``; more go to ``model-0000k-of-0000n.safetensors`` with a
    ``model.safetensors.index.json`` (``weight_map``, ``metadata.total_size``). ``layout="vl"``
    prefixes every name with ``language_model.`` and nests the config under ``text_config``.
    Returns the directory.
    """
    if layout not in ("flat", "vl"):
        raise ValueError(f"layout must be 'flat' or 'vl', got {layout!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = VL_PREFIX if layout == "vl" else ""
    state = {prefix + name: t.detach() for name, t in model.state_dict().items()}
    shards = _plan_shards(state, max_shard_bytes)
    for stale in (directory / SINGLE_FILE, directory / INDEX_FILE):
        stale.unlink(missing_ok=True)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        shard = {n: state[n].to("cpu").contiguous() for n in names}
        save_file(shard, directory / file, metadata={"format": "pt"})
        # safetensors writes its file owner-only (0600); give it the mode of the index and config
        # beside it, which the process's umask sets, so other users and pods can read the weights.
        (directory / file).chmod(0o666 & ~_umask())
        del shard
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(_config_json(config, layout), indent=2) + "\n")
    return directory


# Building a model --------------------------------------------------------------------------------


def _check_materialised(model: nn.Module, directory: Path) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(
            f"after loading {directory}, {len(left)} tensor(s) the checkpoint does not "
            f"hold are still unset, e.g. '{left[0]}'"
        )


def load_model(
    source: str | Path = "tiny",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, ModelConfig]:
    """``(MiniMaxM3ForCausalLM in eval mode, its ModelConfig)`` from a checkpoint directory, or from a
    preset name (``tiny``, ``m3_proxy``, ``m3``) with random weights drawn after
    ``torch.manual_seed(seed)`` on the CPU in fp32, so they do not depend on ``device`` or ``dtype``.
    Nothing is downloaded."""
    from msa.model import MiniMaxM3ForCausalLM

    path = Path(source)
    if path.is_dir():
        config = load_config(path)
        with torch.device("meta"):
            model = MiniMaxM3ForCausalLM(config)
        load_checkpoint(model, path, dtype=dtype, device=device, progress=progress)
        _check_materialised(model, path)
    else:
        config = model_config_of(source)
        torch.manual_seed(seed)
        model = cast_model(MiniMaxM3ForCausalLM(config), dtype=dtype, device=device)
    return model.eval(), config
