"""``ServeConfig``: the arguments of the Serve application (``serve.yaml``'s ``args``, ``msa serve``'s
flags), and the engine config and replica resources they imply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msa.cluster.config import EngineConfig
from msa.platform.config import PRESETS, ConfigError, ModelConfig, load_config, preset

# On CPU the KV cache is sized by pages; this holds 4096 tokens of the tiny model (4-token blocks).
DEFAULT_CPU_PAGES = 1024
# Tokens one engine step may carry (``max_num_batched_tokens``) unless ``engine`` sets it: vLLM's
# OpenAI-server defaults, 8192 on 80 GB-class GPUs (H100, H200) and 2048 elsewhere.
DEFAULT_STEP_TOKENS = {"cuda": 8192, "cpu": 2048}


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"serve argument '{name}' must be {allowed}, got {value!r}")


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    """model: a preset name or a checkpoint directory. device None picks "cuda" when the cluster has
    GPUs. ``engine`` passes further ``EngineConfig`` fields (e.g. ``max_num_batched_tokens``).
    ``engine_process``: the engine and its step loop run in a Ray actor beside the replica, which
    then only serves HTTP (as vLLM separates its API server from its engine core); off, they share
    the replica's process. Unset: on for GPU engines (their host threads then never wait on the
    HTTP work), off on CPU (where the engine needs those cores itself). ``replica_num_cpus``: the
    CPUs reserved for the engine's process. ``api_servers``: replicas that serve HTTP for one
    engine, each in its own process (as vLLM's ``--api-server-count``), so the parsing, validation
    and streaming of many requests at once spread over that many cores; above 1 the engine runs in
    a Serve deployment-scoped actor that they share, and ``num_replicas`` must be 1."""

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
    api_servers: int = 1
    max_ongoing_requests: int = 1024
    replica_num_cpus: float = 1.0
    engine_process: bool | None = None
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
        for name in (
            "tp",
            "sp",
            "max_waiting",
            "max_num_seqs",
            "num_replicas",
            "api_servers",
            "max_ongoing_requests",
        ):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
        _check(self.device in (None, "cpu", "cuda"), "device", "'cpu', 'cuda' or unset", self.device)
        _check(
            self.api_key is None or bool(self.api_key), "api_key", "a non-empty string or unset", self.api_key
        )
        if self.api_servers > 1:
            shared = "api_servers > 1 (they share one engine)"
            _check(self.num_replicas == 1, "num_replicas", f"1 with {shared}", self.num_replicas)
            _check(
                self.engine_process is not False,
                "engine_process",
                f"on or unset with {shared}",
                self.engine_process,
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

    def model_config(self) -> ModelConfig:
        """The model's config without its weights: a checkpoint directory's config.json (the
        directory must exist on this host), else the preset's. Errors name ``model``."""
        path = Path(self.model)
        if not path.is_dir() and self.model in PRESETS:
            return preset(self.model)
        if not path.exists():
            raise ConfigError(f"serve argument 'model' {self.model!r}: no such directory")
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"serve argument 'model' must be a directory holding config.json, got {self.model!r}"
            )
        return load_config(path)

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
            "max_num_batched_tokens": max(DEFAULT_STEP_TOKENS[device], self.max_num_seqs),
            "num_pages": self.num_pages,
        }
        fields.update(self.engine)
        unsized = fields.get("num_pages") is None and fields.get("kv_cache_memory_bytes") is None
        if device == "cpu" and unsized:
            fields["num_pages"] = DEFAULT_CPU_PAGES
        return EngineConfig(**fields)

    @property
    def runs_engine_process(self) -> bool:
        if self.shares_engine:
            return True
        return self.engine_process if self.engine_process is not None else self.device == "cuda"

    @property
    def shares_engine(self) -> bool:
        """Whether the replicas are API servers of one engine (a deployment-scoped actor)."""
        return self.api_servers > 1

    @property
    def deployment_replicas(self) -> int:
        """Replicas of the Serve deployment: one per engine, or the API servers of the one engine."""
        return self.api_servers if self.shares_engine else self.num_replicas

    def replica_actor_options(self) -> dict[str, Any]:
        """With ``engine_process`` the replica only serves HTTP and its engine runs in an actor of
        its own (``engine_actor_options``). Otherwise the replica holds the model itself when it
        runs a single shard (in-process); else its shards take the GPUs through the engine's own
        placement group."""
        if self.runs_engine_process:
            # One CPU for the HTTP work, which also keeps the replica off CPU-less head nodes:
            # its engine actor is placed on the replica's node.
            return {"num_cpus": 1, "num_gpus": 0}
        return {"num_cpus": self.replica_num_cpus, "num_gpus": self._single_shard_gpus()}

    def engine_actor_options(self) -> dict[str, Any]:
        """Resources of the engine's own process (``engine_process``): the replica's CPUs, and the
        GPU when it runs a single shard in-process."""
        return {"num_cpus": self.replica_num_cpus, "num_gpus": self._single_shard_gpus()}

    def resource_demand(self) -> dict[str, float]:
        """The CPUs and GPUs the application reserves: its replicas, their engine processes, and
        the shard actors of each engine's placement group."""
        from msa.cluster.placement import shard_bundle

        engine = self.engine_config()
        engines = 1 if self.shares_engine else self.num_replicas
        demand = {"CPU": 0.0, "GPU": 0.0}
        actors = [(self.replica_actor_options(), self.deployment_replicas)]
        if self.runs_engine_process:
            actors.append((self.engine_actor_options(), engines))
        for options, n in actors:
            demand["CPU"] += options["num_cpus"] * n
            demand["GPU"] += options["num_gpus"] * n
        if engine.world_size > 1 or engine.ray_shards:
            for resource, amount in shard_bundle(engine.device == "cuda").items():
                demand[resource] += amount * engines * engine.world_size
        return demand

    def _single_shard_gpus(self) -> int:
        engine = self.engine_config()
        return 1 if self.device == "cuda" and engine.world_size == 1 and not engine.ray_shards else 0
