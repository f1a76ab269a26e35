"""Configuration of one engine replica: which model, how it is split, how much it may hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msa.platform.config import ConfigError, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Steps up to this many tokens run from CUDA graphs by default (vLLM captures up to 512 too).
DEFAULT_GRAPH_TOKENS = 512


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"engine config field '{name}' must be {allowed}, got {value!r}")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """One engine replica: ``tp`` tensor-parallel ranks times ``sp`` sequence-sharded ranks.

    model: a preset name ("tiny", "m3_proxy", "m3"), a checkpoint directory, or a ModelConfig
    (random weights drawn after ``torch.manual_seed(seed)``, as for a preset).
    random_init: where a preset's or ModelConfig's random weights are drawn: "cpu" (fp32 on the
    CPU, then cast and sliced: equal to the single-process model) or "device" (on each shard's
    device in its dtype: fast for large models; see ``msa.cluster.loading``).
    num_pages: KV pages per shard; when None, GPU shards size their cache from free memory x
    ``gpu_memory_utilization`` after the weights, CPU shards from ``kv_cache_memory_bytes``.
    max_num_batched_tokens: per-step token budget shared by decodes and prefill chunks.
    max_waiting: requests allowed to queue before ``generate`` raises EngineOverloadedError.
    weight_bucket_bytes: payload size of one weight-update bucket (``msa.cluster.weights``).
    ray_shards: run the shard as a Ray actor even when tp = sp = 1, so it gets a GPU of its own
    from Ray instead of the caller's (RL: the engine beside its trainers' GPUs).
    cuda_graph_max_tokens: steps of at most this many tokens replay the token-wise parts of every
    layer from CUDA graphs (``msa.model.graphs``; GPU shards without tensor parallelism, tp = 1: the
    sequence shards' collectives sit in the attention, which runs eagerly); None: 512 (at least
    max_num_seqs, at most max_num_batched_tokens), so every decode step and the steps that prefill
    a few prompts, as vLLM's default; 0: every step eagerly (vLLM's enforce_eager).
    """

    model: str | ModelConfig = "tiny"
    tp: int = 1
    sp: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    random_init: str = "cpu"
    num_pages: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    weight_bucket_bytes: int = 256 << 20
    step_timeout_s: float = 300.0
    health_timeout_s: float = 30.0
    start_timeout_s: float = 600.0
    tokenizer: str | None = None
    ray_shards: bool = False
    cuda_graph_max_tokens: int | None = None

    def __post_init__(self) -> None:
        counts = ("tp", "sp", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "weight_bucket_bytes")
        for name in counts:
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
        _check(self.device in ("cpu", "cuda"), "device", "'cpu' or 'cuda'", self.device)
        _check(self.dtype in _DTYPES, "dtype", f"one of {sorted(_DTYPES)}", self.dtype)
        _check(self.random_init in ("cpu", "device"), "random_init", "'cpu' or 'device'", self.random_init)
        _check(
            self.num_pages is None or (isinstance(self.num_pages, int) and self.num_pages >= 1),
            "num_pages",
            "None or an integer >= 1",
            self.num_pages,
        )
        _check(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
            "kv_cache_memory_bytes",
            "None or > 0",
            self.kv_cache_memory_bytes,
        )
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            "in (0, 1]",
            self.gpu_memory_utilization,
        )
        _check(
            self.max_num_batched_tokens >= self.max_num_seqs,
            "max_num_batched_tokens",
            f">= max_num_seqs ({self.max_num_seqs}) so every running decode fits a step",
            self.max_num_batched_tokens,
        )
        _check(
            self.cuda_graph_max_tokens is None
            or (isinstance(self.cuda_graph_max_tokens, int) and self.cuda_graph_max_tokens >= 0),
            "cuda_graph_max_tokens",
            "None or an integer >= 0",
            self.cuda_graph_max_tokens,
        )
        if self.device == "cpu":
            _check(
                self.num_pages is not None or self.kv_cache_memory_bytes is not None,
                "num_pages",
                "set (or kv_cache_memory_bytes) when device is 'cpu'",
                self.num_pages,
            )
        for name in ("step_timeout_s", "health_timeout_s", "start_timeout_s"):
            _check(getattr(self, name) > 0, name, "> 0 seconds", getattr(self, name))

    @property
    def world_size(self) -> int:
        return self.tp * self.sp

    @property
    def graph_tokens(self) -> int:
        """``cuda_graph_max_tokens`` resolved (None: 512, at least max_num_seqs, at most the step budget)."""
        if self.cuda_graph_max_tokens is not None:
            return self.cuda_graph_max_tokens
        return min(self.max_num_batched_tokens, max(self.max_num_seqs, DEFAULT_GRAPH_TOKENS))

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
