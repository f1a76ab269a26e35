"""``ServeConfig``: the arguments of the Serve application (``serve.yaml``'s ``args``, ``msa serve``'s
flags), and the engine config and replica resources they imply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msa.cluster.config import EngineConfig
from msa.platform.config import PRESETS, ConfigError

# On CPU the KV cache is sized by pages; this holds 4096 tokens of the tiny model (4-token blocks).
DEFAULT_CPU_PAGES = 1024


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"serve argument '{name}' must be {allowed}, got {value!r}")


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    """model: a preset name or a checkpoint directory. device None picks "cuda" when the cluster has
    GPUs. ``engine`` passes further ``EngineConfig`` fields (e.g. ``max_num_batched_tokens``)."""

    model: str = "tiny"
    tp: int = 1
    sp: int = 1
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting: int = 1024
    device: str | None = None
    dtype: str | None = None
    num_pages: int | None = None
    max_num_seqs: int = 64
    num_replicas: int = 1
    max_ongoing_requests: int = 1024
    replica_num_cpus: float = 1.0
    engine: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A checkpoint directory may exist only on the GPU nodes, so a path is not required to exist here.
        path_like = Path(self.model).is_dir() or "/" in self.model
        presets = ", ".join(sorted(PRESETS))
        _check(
            self.model in PRESETS or path_like,
            "model",
            f"a preset ({presets}) or a checkpoint directory",
            self.model,
        )
        for name in ("tp", "sp", "max_waiting", "max_num_seqs", "num_replicas", "max_ongoing_requests"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
        _check(self.device in (None, "cpu", "cuda"), "device", "'cpu', 'cuda' or unset", self.device)
        _check(
            self.api_key is None or bool(self.api_key), "api_key", "a non-empty string or unset", self.api_key
        )
        _check(self.replica_num_cpus >= 0, "replica_num_cpus", ">= 0", self.replica_num_cpus)
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(self.engine) - known)
        _check(
            not unknown, "engine", f"a mapping of EngineConfig fields ({', '.join(sorted(known))})", unknown
        )

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeConfig:
        """From Serve's application args; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"unknown serve argument(s) {unknown}; known: {sorted(known)}")
        return cls(**args)

    @property
    def model_name(self) -> str:
        """The name clients put in ``model``: served_model_name, else the preset or directory name."""
        return self.served_model_name or Path(self.model).name

    def resolved(self, cluster_gpus: float) -> ServeConfig:
        """A copy with ``device`` (and the CPU page count) decided for a cluster with ``cluster_gpus``."""
        device = self.device or ("cuda" if cluster_gpus > 0 else "cpu")
        return dataclasses.replace(self, device=device)

    def engine_config(self) -> EngineConfig:
        device = self.device or "cpu"
        fields: dict[str, Any] = {
            "model": self.model,
            "tp": self.tp,
            "sp": self.sp,
            "device": device,
            "dtype": self.dtype or ("bfloat16" if device == "cuda" else "float32"),
            "max_num_seqs": self.max_num_seqs,
            "max_waiting": self.max_waiting,
            "max_num_batched_tokens": max(2048, self.max_num_seqs),
            "num_pages": self.num_pages,
        }
        fields.update(self.engine)
        unsized = fields.get("num_pages") is None and fields.get("kv_cache_memory_bytes") is None
        if device == "cpu" and unsized:
            fields["num_pages"] = DEFAULT_CPU_PAGES
        return EngineConfig(**fields)

    def replica_actor_options(self) -> dict[str, Any]:
        """The replica itself holds the model only when it runs a single shard (in-process);
        otherwise its shards take the GPUs through the engine's own placement group."""
        in_process_gpu = self.device == "cuda" and self.tp * self.sp == 1
        return {"num_cpus": self.replica_num_cpus, "num_gpus": 1 if in_process_gpu else 0}
