"""One model shard: its slice of the weights, its KV pages, and the steps it runs.

``ModelShard`` is a plain class. ``LocalExecutor`` runs one in-process; ``RayExecutor`` runs one per
bundle as a Ray actor (``ray.remote(ModelShard)``). Every rank of a replica receives the same
``StepPlan``, builds its own ``AttentionBatch`` from its sequence shard's page tables, and runs the
forward; rank 0 samples.
"""

from __future__ import annotations

import logging
import socket
import time
import warnings
from dataclasses import dataclass

import torch

from msa.cluster.loading import load_shard_model
from msa.cluster.parallel import (
    ContextParallelGroup,
    ParallelGroups,
    init_parallel_groups,
    slice_for_rank,
)
from msa.cluster.protocol import WeightUpdateError
from msa.cluster.sampler import SampleResult, sample
from msa.cluster.scheduler import StepPlan
from msa.cluster.step_inputs import StepInputBuilder
from msa.cluster.weight_transport import WeightGroup, receive_buckets
from msa.cluster.weights import (
    BucketLayout,
    BucketSpec,
    WeightBucket,
    bucket_check,
    bucket_views,
    raise_on_mismatch,
    unpack_bucket,
)
from msa.kernels.api import use_triton
from msa.kernels.warmup import warm_up_attention
from msa.model.attention import Attention
from msa.model.graphs import PiecewiseForward, capture_sizes, uncapturable_reason
from msa.model.kv_cache import PagedKVCache, cache_free_batch
from msa.platform.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ShardSpec:
    """What a shard needs to build itself; ``rank`` = sp_rank * tp + tp_rank."""

    model: str | ModelConfig
    dtype: torch.dtype
    device: str
    seed: int
    tp: int
    sp: int
    rank: int
    num_pages: int | None
    kv_cache_memory_bytes: int | None
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    collective_timeout_s: float
    random_init: str = "cpu"
    cuda_graph_max_tokens: int = 0
    max_num_seqs: int = 64


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A TCP port on ``host`` that nothing listens on right now; with ``count``, the first of that
    many consecutive ones."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            first = s.getsockname()[1]
        try:
            for port in range(first + 1, first + count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
            return first
        except OSError:  # one of the next ones is taken (or past 65535): another start
            continue


class ModelShard:
    """Builds nothing in ``__init__`` (so actor creation is quick); ``setup`` loads the weights."""

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.groups: ParallelGroups | None = None
        self.model = None
        self.cache: PagedKVCache | None = None
        self._inputs: StepInputBuilder | None = None
        self._context_parallel: ContextParallelGroup | None = None
        self._pieces: PiecewiseForward | None = None
        self.weight_version = 0
        self._staged: list[tuple[str, torch.Tensor]] = []
        self._staged_version: int | None = None
        self._weight_group: WeightGroup | None = None
        self._weight_layout: BucketLayout | None = None

    def free_port(self) -> int:
        return free_port()

    @property
    def device(self) -> torch.device:
        if self.spec.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def setup(self, port: int) -> int:
        """Join the replica's process groups, load and slice the model, and return how many KV
        pages this shard can hold."""
        s = self.spec
        if s.device == "cpu" and s.tp * s.sp > 1:
            torch.set_num_threads(1)  # shard actors share the host's cores
        backend = "nccl" if s.device == "cuda" else "gloo"
        self.groups = init_parallel_groups(s.rank, s.tp, s.sp, port, backend, s.collective_timeout_s)
        self.model = load_shard_model(
            s.model, self.groups, dtype=s.dtype, device=self.device, seed=s.seed, random_init=s.random_init
        )
        return self._page_capacity()

    def _kv_heads(self) -> int:
        return self.model.config.num_key_value_heads // self.spec.tp

    def bytes_per_page(self) -> int:
        return PagedKVCache.bytes_per_page(
            self.model.config, dtype=self.spec.dtype, kv_heads=self._kv_heads(), num_mtp=0
        )

    def _page_capacity(self) -> int:
        s = self.spec
        if s.num_pages is not None:
            return s.num_pages
        if s.device == "cpu":
            return s.kv_cache_memory_bytes // self.bytes_per_page()
        # Peak activations of the largest step, measured by running one (cache-free) of that size.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._profile_forward(s.max_num_batched_tokens)
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated()
        activations = torch.cuda.max_memory_allocated() - weights
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        outside_torch = total - free - torch.cuda.memory_reserved()  # CUDA context, NCCL, other processes
        budget = total * s.gpu_memory_utilization - outside_torch - weights - activations
        return max(0, int(budget // self.bytes_per_page()))

    @torch.no_grad()
    def _profile_forward(self, num_tokens: int) -> None:
        config = self.model.config
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        batch = cache_free_batch([num_tokens], config.sparse.block_size, device=self.device)
        self.model(ids, batch, rows=batch.last_token_rows())

    def init_cache(self, num_pages: int) -> None:
        self.cache = PagedKVCache(
            self.model.config,
            num_pages,
            dtype=self.spec.dtype,
            device=self.device,
            kv_heads=self._kv_heads(),
            num_mtp=0,
        )
        g = self.groups
        self._inputs = StepInputBuilder(self.device, self.cache.block_size, g.sp_rank, g.sp)
        self._context_parallel = ContextParallelGroup(g.cp_group, g.sp) if g.sp > 1 else None
        self._pieces = self._capture_graphs()
        self._warm_up_kernels()

    def _capture_graphs(self) -> PiecewiseForward | None:
        """The model's token-wise pieces captured as CUDA graphs, when configured and possible."""
        s = self.spec
        if s.device != "cuda" or s.cuda_graph_max_tokens == 0:
            return None
        if s.tp > 1:
            log.info("shard %d runs every step eagerly: its layers all-reduce across tp ranks", s.rank)
            return None
        reason = uncapturable_reason(self.model)
        if reason is not None:
            log.warning("shard %d runs every step eagerly, without CUDA graphs: %s", s.rank, reason)
            return None
        start = time.perf_counter()
        pieces = PiecewiseForward(self.model, capture_sizes(s.cuda_graph_max_tokens))
        pieces.capture()
        log.info(
            "shard %d captured CUDA graphs for steps of up to %d tokens (%d sizes) in %.1f s",
            s.rank,
            pieces.max_tokens,
            len(pieces.sizes),
            time.perf_counter() - start,
        )
        return pieces

    def _warm_up_kernels(self) -> None:
        """Compile the attention kernels now (GPU), so no serving step waits on a compile: a
        cache-free forward of a fresh prompt of each power-of-two length up to the step budget
        (the prefill kernels' tile sizes), then ``warm_up_attention`` over every batch size and
        context length a decode (or short query run) can have here."""
        cached = [m for m in self.model.modules() if isinstance(m, Attention) and m.layer < len(self.cache.k)]
        attn = next((m for m in cached if m.sparse), cached[0])
        layer = attn.layer
        k = self.cache.k[layer]
        if (
            self.spec.device != "cuda"
            or self.cache.num_pages == 0
            or not use_triton(k, k.shape[1], k.shape[3])
        ):
            return  # CPU, or shapes the PyTorch reference serves: nothing to compile
        start = time.perf_counter()
        n = 1
        while n < self.spec.max_num_batched_tokens:
            self._profile_forward(n)
            n *= 2
        if self.spec.num_pages is not None:  # otherwise sizing the cache already ran the full step
            self._profile_forward(self.spec.max_num_batched_tokens)
        runs = warm_up_attention(
            self.cache.k[layer],
            self.cache.v[layer],
            self.cache.index_k[layer] if attn.sparse else None,
            num_heads=attn.q_proj.weight.shape[0] // attn.head_dim,
            index_heads=attn.index_q_proj.weight.shape[0] // attn.index_dim if attn.sparse else 1,
            topk=attn.topk if attn.sparse else 1,
            max_seqs=self.spec.max_num_seqs,
            max_blocks=self.cache.num_pages,
            shard_rank=self.groups.sp_rank,
            shard_world=self.groups.sp,
            step_tokens=self.spec.max_num_batched_tokens,
        )
        torch.cuda.synchronize()
        log.info(
            "shard %d warmed up its attention kernels (prefills up to %d tokens, %d other shapes) in %.1f s",
            self.spec.rank,
            self.spec.max_num_batched_tokens,
            runs,
            time.perf_counter() - start,
        )

    def execute(self, plan: StepPlan) -> SampleResult | None:
        """Run one step; rank 0 returns the sampled tokens, the other ranks None."""
        if plan.profile and self.groups.rank == 0:
            return self._profiled(plan)
        return self._execute(plan)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _profiled(self, plan: StepPlan) -> SampleResult:
        """The step under torch.profiler: wall seconds and self device time (us) per kernel name."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            result = self._execute(plan)
            self._synchronize()
        wall = time.perf_counter() - start
        kernels: dict[str, float] = {}
        for event in prof.key_averages():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                kernels[event.key] = kernels.get(event.key, 0.0) + float(event.self_device_time_total)
        result.profile = {"wall_s": wall, "device_kernels_us": kernels}
        return result

    @torch.no_grad()
    def fill_cache_random(self, seed: int) -> None:
        """Fill every cache page with random values: decode cost at a context length can then be
        measured without first prefilling it (benchmarks)."""
        torch.manual_seed(seed + self.groups.rank)
        for tensors in (self.cache.k, self.cache.v, self.cache.index_k):
            for t in tensors:
                if t is not None:
                    t.normal_()

    @torch.no_grad()
    def _execute(self, plan: StepPlan) -> SampleResult | None:
        g = self.groups
        step = self._inputs.build(plan, self.cache, self._context_parallel)
        if self._pieces is not None and self._pieces.fits(step.token_ids.shape[0]):
            logits = self._pieces(step.token_ids, step.batch, step.sample_rows)
        else:
            logits = self.model(step.token_ids, step.batch, rows=step.sample_rows)
        if g.rank != 0:
            return None
        return sample(logits, plan.samples, keep_logits=plan.return_logits)

    @torch.no_grad()
    def check_health(self) -> int:
        """A real one-token forward through every layer (with the tensor-parallel collectives)."""
        self._profile_forward(1)
        return self.weight_version

    def _start_staging(self, version: int) -> None:
        if self._staged_version != version:
            self._staged, self._staged_version = [], version

    def _stage_views(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Keep copies of this rank's slices (as the initial load cuts them) of full tensors."""
        pieces = slice_for_rank(self.model, named, self.groups)
        self._staged.extend((name, t.clone()) for name, t in pieces)
        return len(pieces)

    def stage_weights(self, bucket: WeightBucket) -> int:
        """Verify a bucket's checksum and keep this rank's slices of its tensors until
        ``commit_weights``; returns how many tensors it kept. Raises WeightUpdateError. The slices
        wait in host memory, so this path needs no device memory beyond the model."""
        self._start_staging(bucket.version)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Ray hands the payload over read-only
            tensors = unpack_bucket(bucket)
        return self._stage_views(tensors)

    def open_weight_group(
        self, host: str, port: int, world: int, first_rank: int, layout: BucketLayout, timeout_s: float
    ) -> None:
        """Join the trainer -> engine weight group (``msa.cluster.weight_transport``) as rank
        ``first_rank + spec.rank``; every later ``receive_weights`` expects buckets of ``layout``."""
        self.close_weight_group()
        self._weight_group = WeightGroup(
            host, port, first_rank + self.spec.rank, world, self.device, timeout_s
        )
        self._weight_layout = layout

    def close_weight_group(self) -> None:
        if self._weight_group is not None:
            self._weight_group.close()
        self._weight_group, self._weight_layout = None, None

    @torch.no_grad()
    def receive_weights(self, version: int) -> int:
        """Take every bucket of one broadcast from the weight group, keep this rank's slices until
        ``commit_weights``, then check every bucket's checksum and version at once. Returns the
        tensors kept; raises WeightUpdateError naming the first bad bucket. Every bucket is taken
        off the wire even after an error, so the sender never waits on this shard. The slices wait
        on the device: for the sync this shard needs room for a second copy of its weights and two
        buckets beyond its KV cache."""
        if self._weight_group is None:
            raise WeightUpdateError("this shard has not joined a weight group (open_weight_group)")
        self._start_staging(version)
        specs: list[BucketSpec] = []
        checks: list[torch.Tensor] = []
        error: WeightUpdateError | None = None
        kept = 0
        for spec, flat in receive_buckets(self._weight_group, self._weight_layout):
            specs.append(spec)
            checks.append(bucket_check(spec, flat))
            if error is None:
                try:
                    kept += self._stage_views(bucket_views(spec, flat))
                except WeightUpdateError as e:
                    error = e
        if error is not None:
            raise error
        if checks:
            raise_on_mismatch(specs, torch.stack(checks).cpu(), version)
        return kept

    @torch.no_grad()
    def commit_weights(self, version: int) -> int:
        """Copy the staged tensors of ``version`` into the model; later steps run on it."""
        if self._staged_version != version:
            raise WeightUpdateError(
                f"no staged weights of version {version} (staged: {self._staged_version})"
            )
        params = dict(self.model.named_parameters())
        for name, value in self._staged:
            params[name].copy_(value)
        self.discard_weights()
        self.weight_version = version
        return version

    def discard_weights(self) -> None:
        self._staged, self._staged_version = [], None

    def shutdown(self) -> None:
        self.close_weight_group()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
