"""Model configuration: dataclasses read from a checkpoint's config.json, validated, with presets.

Two config.json layouts are read: the vision-language one (``model_type`` ``minimax_m3_vl`` with the
language model under ``text_config``) and a flat text-only one. Field names follow the published
config; a few fields have aliases used by other copies of it.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config field is missing or outside what is allowed; the message names the field."""


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config field '{name}' must be {allowed}, got {value!r}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(obj: Any, *names: str, prefix: str = "") -> None:
    """Each attribute must be a positive int; ``prefix`` turns it into its config.json key."""
    for name in names:
        value = getattr(obj, name)
        _require(is_int(value) and value > 0, prefix + name, "a positive integer", value)


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(is_int(value) and value >= 0, name, "a non-negative integer", value)


def _positive_number(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(
            is_real(value) and value > 0,
            name,
            "a positive number",
            value,
        )


def _token_id(value: Any, vocab_size: int) -> bool:
    return is_int(value) and 0 <= value < vocab_size


@dataclass(kw_only=True, slots=True)
class SparseAttentionConfig:
    """The MSA indexer: which 128-token blocks each query attends to."""

    block_size: int = 128
    topk_blocks: int = 16
    num_index_heads: int = 4
    index_dim: int = 128
    score_type: str = "max"
    init_blocks: int = 0
    local_blocks: int = 1
    disable_index_value: bool = True

    def __post_init__(self) -> None:
        _positive(self, "block_size", "topk_blocks", "num_index_heads", "index_dim", prefix="sparse_")
        _require(self.score_type == "max", "sparse_score_type", "'max'", self.score_type)
        _require(self.init_blocks == 0, "sparse_init_block", "0 (no forced initial block)", self.init_blocks)
        _require(
            self.local_blocks == 1, "sparse_local_block", "1 (the current block is forced)", self.local_blocks
        )
        _require(
            self.disable_index_value is True,
            "sparse_disable_index_value",
            "the boolean true (index-value branches are not part of MSA on this model)",
            self.disable_index_value,
        )
        _require(self.topk_blocks >= 2, "sparse_topk_blocks", "at least 2", self.topk_blocks)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The MiniMax-M3 text backbone. Per-layer kinds come from ``moe_layer_freq`` and
    ``sparse_attention_freq`` (one 0/1 entry per layer)."""

    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 60
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 128
    rotary_dim: int = 64
    rope_theta: float = 5_000_000.0
    max_position_embeddings: int = 1_048_576
    rms_norm_eps: float = 1e-6
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    intermediate_size: int = 12288
    moe_intermediate_size: int = 3072
    shared_intermediate_size: int = 3072
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    routed_scaling_factor: float = 2.0
    moe_layer_freq: list[int] = field(default_factory=lambda: [0, 0, 0] + [1] * 57)
    sparse_attention_freq: list[int] = field(default_factory=lambda: [0, 0, 0] + [1] * 57)
    num_mtp_modules: int = 7
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sparse: SparseAttentionConfig = field(default_factory=SparseAttentionConfig)

    def __post_init__(self) -> None:
        _positive(
            self,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rotary_dim",
            "max_position_embeddings",
            "intermediate_size",
            "moe_intermediate_size",
            "num_local_experts",
            "num_experts_per_tok",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_attention_heads",
            f"a multiple of num_key_value_heads ({self.num_key_value_heads})",
            self.num_attention_heads,
        )
        _require(
            self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
            "rotary_dim",
            f"an even number <= head_dim ({self.head_dim})",
            self.rotary_dim,
        )
        _positive_number(
            self, "rope_theta", "rms_norm_eps", "swiglu_alpha", "swiglu_limit", "routed_scaling_factor"
        )
        _require(self.rms_norm_eps < 1, "rms_norm_eps", "in (0, 1)", self.rms_norm_eps)
        _require(
            self.num_experts_per_tok <= self.num_local_experts,
            "num_experts_per_tok",
            f"<= num_local_experts ({self.num_local_experts})",
            self.num_experts_per_tok,
        )
        _non_negative(self, "shared_intermediate_size", "num_mtp_modules")
        _require(
            not self.tie_word_embeddings,
            "tie_word_embeddings",
            "false (M3 has an untied lm_head)",
            self.tie_word_embeddings,
        )
        _require(
            self.bos_token_id is None or _token_id(self.bos_token_id, self.vocab_size),
            "bos_token_id",
            f"null or a token id in [0, {self.vocab_size})",
            self.bos_token_id,
        )
        eos = [self.eos_token_id] if not isinstance(self.eos_token_id, list) else self.eos_token_id
        _require(
            self.eos_token_id is None or all(_token_id(t, self.vocab_size) for t in eos),
            "eos_token_id",
            f"null, a token id or a list of token ids in [0, {self.vocab_size})",
            self.eos_token_id,
        )
        for name in ("moe_layer_freq", "sparse_attention_freq"):
            value = getattr(self, name)
            _require(
                isinstance(value, list)
                and len(value) == self.num_hidden_layers
                and all(v in (0, 1) for v in value),
                name,
                f"a list of {self.num_hidden_layers} entries, each 0 or 1",
                value,
            )
        if any(self.sparse_attention_freq):
            _require(
                self.sparse.num_index_heads == self.num_key_value_heads,
                "sparse_num_index_heads",
                f"equal to num_key_value_heads ({self.num_key_value_heads}): one index head per KV group",
                self.sparse.num_index_heads,
            )
            _require(
                self.sparse.index_dim <= self.head_dim * 4,
                "sparse_index_dim",
                "<= 4 * head_dim",
                self.sparse.index_dim,
            )
            # The index query and key get the same partial RoPE as the main heads.
            _require(
                self.sparse.index_dim >= self.rotary_dim,
                "sparse_index_dim",
                f">= rotary_dim ({self.rotary_dim}), the dims the index heads rotate",
                self.sparse.index_dim,
            )

    # Derived facts the model and engine use.
    def is_sparse_layer(self, layer: int) -> bool:
        return bool(self.sparse_attention_freq[layer])

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layer_freq[layer])

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # Serialisation in the checkpoint's flat text layout.
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sparse"}
        out["model_type"] = "minimax_m3"
        out["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        out["use_qk_norm"] = True
        out["qk_norm_type"] = "per_head"
        out["hidden_act"] = "swigluoai"
        out["sparse_attention_config"] = {
            f"sparse_{key}": getattr(self.sparse, attr) for key, attr in _SPARSE_KEYS.items()
        }
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_SPARSE_KEYS = {  # config.json key (after the "sparse_" prefix) -> SparseAttentionConfig field
    "block_size": "block_size",
    "topk_blocks": "topk_blocks",
    "num_index_heads": "num_index_heads",
    "index_dim": "index_dim",
    "score_type": "score_type",
    "init_block": "init_blocks",
    "local_block": "local_blocks",
    "disable_index_value": "disable_index_value",
}
_ALIASES = {  # other spellings seen in copies of the config -> our field
    "num_experts": "num_local_experts",
    "n_routed_experts": "num_local_experts",
}
_DEFAULT_HEAD_DIM = ModelConfig().head_dim
_DEFAULT_ROTARY_FACTOR = 0.5  # M3: rotary_dim 64 of head_dim 128
# Keys that describe fixed properties of this architecture: checked, then dropped.
_FIXED = {
    "use_qk_norm": (True,),
    "qk_norm_type": ("per_head",),
    "hidden_act": ("swigluoai",),
    "attention_output_gate": (False,),
    "scoring_func": ("sigmoid",),
}


def _sparse_from_dict(raw: dict[str, Any]) -> SparseAttentionConfig:
    kwargs = {}
    for key, value in raw.items():
        short = key.removeprefix("sparse_")
        if short in _SPARSE_KEYS:
            kwargs[_SPARSE_KEYS[short]] = value
    return SparseAttentionConfig(**kwargs)


def _rotary_dim(text: dict[str, Any]) -> int | None:
    """``rotary_dim`` when config.json gives only ``partial_rotary_factor``, or neither: that
    fraction (default 0.5) of ``head_dim``. An absent ``head_dim`` is 128, as in the MiniMax-M2
    config of transformers and vLLM: M3's heads are not ``hidden_size // num_attention_heads``
    (6144 / 64 = 96) wide. None when ``head_dim`` is invalid, which ModelConfig then reports."""
    head_dim = text.get("head_dim", _DEFAULT_HEAD_DIM)
    factor = text.get("partial_rotary_factor", _DEFAULT_ROTARY_FACTOR)
    _require(
        is_real(factor) and 0 < factor <= 1,
        "partial_rotary_factor",
        "a number in (0, 1]",
        factor,
    )
    return int(head_dim * factor) if is_int(head_dim) and head_dim > 0 else None


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a config.json dict in either layout. Unknown keys are ignored
    (config.json carries many that do not shape the network); known ones are validated. Absent
    ones take ModelConfig's defaults (M3's), except ``rotary_dim``, which follows ``head_dim``."""
    text = raw.get("text_config", raw)
    _require(isinstance(text, dict), "text_config", "a mapping of config fields", text)
    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"sparse"}
    kwargs: dict[str, Any] = {}
    for key, value in text.items():
        key = _ALIASES.get(key, key)
        if key in _FIXED:
            _require(value in _FIXED[key], key, " or ".join(repr(v) for v in _FIXED[key]), value)
        elif key in names:
            kwargs[key] = value
    if "rotary_dim" not in text:
        rotary_dim = _rotary_dim(text)
        if rotary_dim is not None:
            kwargs["rotary_dim"] = rotary_dim
    sparse_raw = text.get("sparse_attention_config") or {
        k: v for k, v in text.items() if k.startswith("sparse_")
    }
    _require(
        isinstance(sparse_raw, dict), "sparse_attention_config", "a mapping of sparse_* fields", sparse_raw
    )
    kwargs["sparse"] = _sparse_from_dict(sparse_raw) if sparse_raw else SparseAttentionConfig()
    if "moe_layer_freq" in kwargs and isinstance(kwargs["moe_layer_freq"], int):
        raise ConfigError("config field 'moe_layer_freq' must be a list of 0/1 per layer, got an int")
    return ModelConfig(**kwargs)


def load_config(path: str | Path) -> ModelConfig:
    """Read a config from a checkpoint directory, a config.json file or a YAML file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no model config at {path}")
    text = path.read_text()
    raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields")
    return config_from_dict(raw)


# Presets -----------------------------------------------------------------------------------------


def tiny() -> ModelConfig:
    """Seconds on a CPU, yet with a dense layer, MSA layers and MoE layers, and 4-token blocks so a
    short prompt already spans many blocks and the top-4 selection is really sparse."""
    return ModelConfig(
        vocab_size=264,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rotary_dim=8,
        rope_theta=10_000.0,
        max_position_embeddings=4096,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=2.0,
        moe_layer_freq=[0, 1, 1, 1],
        sparse_attention_freq=[0, 1, 1, 1],
        num_mtp_modules=1,
        bos_token_id=256,
        eos_token_id=257,
        sparse=SparseAttentionConfig(block_size=4, topk_blocks=4, num_index_heads=2, index_dim=16),
    )


def m3_proxy(num_layers: int = 4, num_experts: int = 8) -> ModelConfig:
    """The real M3 layer shapes (hidden 6144, 64/4 heads, 128-token blocks, top-16) with few layers
    and experts: one dense layer, the rest MSA + MoE. For GPU benchmarks."""
    kinds = [0] + [1] * (num_layers - 1)
    return ModelConfig(
        num_hidden_layers=num_layers,
        num_local_experts=num_experts,
        num_experts_per_tok=min(4, num_experts),
        moe_layer_freq=list(kinds),
        sparse_attention_freq=list(kinds),
        num_mtp_modules=1,
    )


def m3() -> ModelConfig:
    """The full published MiniMax-M3 text config."""
    return ModelConfig()


PRESETS = {"tiny": tiny, "m3_proxy": m3_proxy, "m3": m3}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def model_config_of(source: str | Path | ModelConfig) -> ModelConfig:
    """The config of a model given as a ModelConfig, a checkpoint directory or a preset name. A
    directory must exist where it is read: on a cluster, on every node that loads it."""
    if isinstance(source, ModelConfig):
        return source
    path = Path(source)
    if path.is_dir():
        return load_config(path)
    if path.exists():
        raise ConfigError(f"model {str(source)!r} is a file; give the checkpoint directory that holds it")
    if str(source) in PRESETS:
        return preset(str(source))
    raise ConfigError(
        f"model {str(source)!r} is neither a checkpoint directory nor a preset (one of {sorted(PRESETS)}); "
        f"no such path on this host ({socket.gethostname()})"
    )
