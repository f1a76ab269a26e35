"""Decode speed of the engine at long context on 1, 2 and 4 GPUs, MSA vs dense attention side by side.

Per layout (tp x sp shards) one engine holds the m3_proxy model (its random weights drawn on the
GPUs), and per context length and batch size it measures MSA and then dense attention on the same
weights and cache (``StepPlan.dense_attention``: the MSA layers attend densely, without their
indexer): decode tokens/s, time per output token, the device time per step, the share of the
step spent in the attention kernels (indexer, sparse/dense paged attention, LSE merge; from
torch.profiler's device-kernel times on rank 0), and on one GPU the host syncs of a step (CUDA's
sync debug mode). The context is synthetic by default: the KV pages hold random values and
decoding starts at position ``context`` (decode cost does not depend on the cached values;
``--prefill real`` prefills real prompts through the engine instead, MSA only).

Before a layout is timed, the engine on that layout must reproduce single-process greedy tokens of
the tiny model; a layout that fails gets no speed. On one GPU the m3_proxy engine's grouped expert
matmuls are also compared with the loop over experts (``grouped_experts_vs_loop``). Writes
``benchmarks/results/engine-<device>-<layouts>.json``, rewritten after every measurement, so a run
cut short still leaves what it measured (``complete`` tells).

    python benchmarks/engine.py                       # GPUs: 32K, 128K, 1M on 1, 2, 4 GPUs
    python benchmarks/engine.py --layouts 2x2         # one layout
    python benchmarks/engine.py --smoke               # CPU dry run with tiny shapes
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msa.cluster.block_manager import BlockManager, blocks_on_shard  # noqa: E402
from msa.cluster.engine import EngineConfig, MSAEngine  # noqa: E402
from msa.cluster.protocol import SamplingParams  # noqa: E402
from msa.cluster.scheduler import Scheduler  # noqa: E402
from msa.cluster.sequence import Sequence, SequenceStatus  # noqa: E402
from msa.model.generate import generate_stream  # noqa: E402
from msa.model.layers import SparseMoE  # noqa: E402
from msa.platform.checkpoint import load_model  # noqa: E402
from msa.platform.config import ModelConfig, m3_proxy, tiny  # noqa: E402

ATTENTION_KERNEL_MODULES = (
    "msa.kernels.indexer.triton",
    "msa.kernels.sparse_attention.triton",
    "msa.kernels.dense_attention.triton",
    "msa.kernels.merge.triton",
)
KINDS = ("msa", "dense")


def attention_kernel_names() -> set[str]:
    """Names of the Triton kernels that make up attention (as torch.profiler reports them)."""
    try:
        import triton
    except ImportError:
        return set()
    names = set()
    for module_name in ATTENTION_KERNEL_MODULES:
        module = importlib.import_module(module_name)
        names |= {name for name, obj in vars(module).items() if isinstance(obj, triton.runtime.JITFunction)}
    return names


def machine() -> dict:
    """The machine and software versions the numbers come from."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("triton", "ray", "numpy"):
        try:
            info[name] = importlib.import_module(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def engine_config(args: argparse.Namespace, model: ModelConfig | str, tp: int, sp: int, **kw) -> EngineConfig:
    base = dict(
        model=model,
        tp=tp,
        sp=sp,
        device=args.device,
        dtype=args.dtype,
        seed=0,
        random_init="device",
        max_num_seqs=max(args.batches + [8]),
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_pages=args.num_pages,
        gpu_memory_utilization=args.gpu_memory_utilization,
        step_timeout_s=600.0,
        cuda_graph_max_tokens=args.cuda_graph_max_tokens,
    )
    return EngineConfig(**{**base, **kw})


async def check_layout(args: argparse.Namespace, tp: int, sp: int) -> dict:
    """Greedy tokens of the tiny model on this layout vs the single process, in fp32."""
    lengths, max_tokens = [5, 41, 77], 6
    engine = MSAEngine(
        engine_config(
            args,
            "tiny",
            tp,
            sp,
            dtype="float32",
            num_pages=256,
            max_num_batched_tokens=256,
            random_init="cpu",
        )
    )
    await engine.start()
    try:
        prompts = [[random.Random(n).randrange(256) for _ in range(n)] for n in lengths]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        got = []
        for i, p in enumerate(prompts):
            got.append([t async for out in engine.generate(f"check{i}", p, params) for t in out.token_ids])
    finally:
        await engine.shutdown()
    reference, _ = load_model("tiny", dtype=torch.float32, device=args.device, seed=0, progress=False)
    want = [list(generate_stream(reference, p, max_tokens=max_tokens, temperature=0.0)) for p in prompts]
    return {"passed": got == want, "lengths": lengths, "got": got, "want": want}


@torch.no_grad()
def grouped_experts_check(engine: MSAEngine) -> dict:
    """On an in-process engine: the stacked experts' grouped matmuls against the loop over experts,
    on random tokens through the first MoE layer (the kernels the timed steps use)."""
    moe = next(m for m in engine.executor.shard.model.modules() if isinstance(m, SparseMoE))
    x = torch.randn(
        64, engine.model_config.hidden_size, device=moe.stacked[0].device, dtype=moe.stacked[0].dtype
    )
    grouped, stacked = moe(x).float(), moe.stacked
    moe.stacked = None
    try:
        looped = moe(x).float()
    finally:
        moe.stacked = stacked
    return {"max_abs_diff": (grouped - looped).abs().max().item(), "max_abs": looped.abs().max().item()}


def host_syncs(engine: MSAEngine, plan) -> tuple[object, dict]:
    """Run one step of an in-process (1x1) GPU engine with CUDA's sync debug mode on: the step's
    result and where it made the host wait for the device (the sampled tokens' copy is the one
    that has to)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = engine.executor.shard.execute(plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sites = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return result, {"host_syncs_per_step": len(sites), "sync_sites": sites}


def adopt_synthetic_context(scheduler: Scheduler, seq: Sequence, total_tokens: int) -> None:
    """Make ``seq`` a running decode whose first ``num_tokens - 1`` tokens count as cached (their
    pages hold the random values written by fill_cache_random)."""
    scheduler.block_manager.allocate(seq, total_tokens)
    seq.num_cached = seq.num_tokens - 1
    seq.status = SequenceStatus.RUNNING
    scheduler.running.append(seq)


async def decode_steps(
    engine: MSAEngine, context: int, batch: int, kind: str, args: argparse.Namespace, kernels: set[str]
) -> dict:
    """Time ``args.steps`` decode steps of ``batch`` sequences at ``context`` tokens with ``kind``
    attention, then profile ``args.profile_steps`` more."""
    sp, block = engine.config.sp, engine.block_size
    pages = engine.scheduler.block_manager.num_pages
    total = context + args.warmup + args.steps + args.profile_steps + 1
    needed = batch * blocks_on_shard((total + block - 1) // block, 0, sp)
    if needed > pages:
        return {"skipped": f"needs {needed} KV pages per shard, {pages} fit"}
    scheduler = Scheduler(BlockManager(pages, sp, block), max_num_seqs=batch, max_num_batched_tokens=batch)
    rng = random.Random(context * 31 + batch)
    params = SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True)
    # The cached tokens' ids do not matter (their keys and values are random): one id repeated.
    seqs = [
        Sequence(f"b{i}", 0, [rng.randrange(engine.model_config.vocab_size)] * context, params, 0, sp)
        for i in range(batch)
    ]
    for seq in seqs:
        adopt_synthetic_context(scheduler, seq, total)
    by_id = {s.seq_id: s for s in seqs}
    times, profiles, syncs = [], [], {}
    for step in range(args.warmup + args.steps + args.profile_steps):
        plan = scheduler.schedule()
        plan.profile = step >= args.warmup + args.steps
        plan.dense_attention = kind == "dense"
        if step == args.warmup - 1 and args.device == "cuda" and engine.config.world_size == 1:
            result, syncs = host_syncs(engine, plan)
            scheduler.postprocess(plan, by_id, result.token_ids)
            continue
        start = time.perf_counter()
        result = await engine.executor.execute(plan)
        elapsed = time.perf_counter() - start
        if plan.profile:
            profiles.append(result.profile)
        elif step >= args.warmup:
            times.append(elapsed)
        scheduler.postprocess(plan, by_id, result.token_ids)
    return {**summarize(times, profiles, batch, kernels), **syncs}


async def real_prefill_steps(engine: MSAEngine, context: int, batch: int, args: argparse.Namespace) -> dict:
    """Prefill real random prompts through ``generate`` and time the gaps between output tokens."""
    rng = random.Random(context * 31 + batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.warmup + args.steps + 1, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> list[float]:
        prompt = [rng.randrange(vocab) for _ in range(context)]
        stream = engine.generate(f"p{context}-{batch}-{i}", prompt, params)
        stamps = [time.perf_counter() async for _ in stream]
        return [b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :], strict=False)]

    gaps = await asyncio.gather(*[one(i) for i in range(batch)])
    return summarize([statistics.mean(step) for step in zip(*gaps, strict=False)], [], batch, set())


def summarize(times: list[float], profiles: list[dict], batch: int, kernels: set[str]) -> dict:
    step_s = statistics.median(times)
    out = {
        "time_per_output_token_ms": step_s * 1e3,
        "decode_tokens_per_s": batch / statistics.mean(times),
        "steps_timed": len(times),
    }
    if profiles:
        per_kernel: dict[str, float] = {}
        for p in profiles:
            for name, us in p["device_kernels_us"].items():
                per_kernel[name] = per_kernel.get(name, 0.0) + us / len(profiles)
        attention_us = sum(us for name, us in per_kernel.items() if name in kernels)
        device_us = sum(per_kernel.values())
        out.update(
            {
                "device_ms_per_step": device_us / 1e3,
                "attention_kernels_ms_per_step": attention_us / 1e3,
                "attention_share_of_step": attention_us / 1e3 / (step_s * 1e3) if per_kernel else None,
                "attention_share_of_device_time": attention_us / device_us if device_us else None,
                "attention_kernels": sorted(name for name in per_kernel if name in kernels),
            }
        )
    return out


def side_by_side(results: dict[str, dict]) -> dict:
    """MSA's speed-up over dense in time per output token, when both were measured."""
    msa, dense = results.get("msa", {}), results.get("dense", {})
    if "time_per_output_token_ms" in msa and "time_per_output_token_ms" in dense:
        return {"msa_speedup": dense["time_per_output_token_ms"] / msa["time_per_output_token_ms"]}
    return {}


async def bench_layout(
    args: argparse.Namespace, tp: int, sp: int, kernels: set[str], row: dict, save: Callable[[], None]
) -> None:
    """Check one layout, then measure it into ``row`` (saving the report after each result)."""
    began = time.perf_counter()
    check = await check_layout(args, tp, sp)
    print(json.dumps({"layout": f"{tp}x{sp}", "check_passed": check["passed"]}), flush=True)
    row.update(tp=tp, sp=sp, gpus=tp * sp, check=check)
    if not check["passed"]:
        return
    started = time.perf_counter()
    engine = MSAEngine(engine_config(args, model_config(args), tp, sp))
    await engine.start()
    row.update(
        check_s=started - began,
        engine_start_s=time.perf_counter() - started,
        pages_per_shard=engine.scheduler.block_manager.num_pages,
    )
    if engine.config.world_size == 1:
        row["grouped_experts_vs_loop"] = grouped_experts_check(engine)
    try:
        if args.prefill == "synthetic":
            await engine.executor.fill_cache_random(seed=1)
        for context in args.contexts:
            for batch in args.batches:
                res = {}
                for kind in KINDS if args.prefill == "synthetic" else ("msa",):
                    if args.prefill == "synthetic":
                        res[kind] = await decode_steps(engine, context, batch, kind, args, kernels)
                    else:
                        res[kind] = await real_prefill_steps(engine, context, batch, args)
                entry = {"context": context, "batch": batch, **res, **side_by_side(res)}
                print(json.dumps({"layout": row["layout"], **entry}), flush=True)
                row["results"].append(entry)
                save()
    finally:
        await engine.shutdown()
    row["layout_s"] = time.perf_counter() - began


def model_config(args: argparse.Namespace) -> ModelConfig:
    return tiny() if args.smoke else m3_proxy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--smoke", action="store_true", help="CPU dry run: tiny model, short contexts, CPU actors"
    )
    ap.add_argument("--layouts", default=None, help="tp x sp list, e.g. 1x1,1x2,2x1,2x2,1x4")
    ap.add_argument("--contexts", default=None, help="comma-separated context lengths")
    ap.add_argument("--batches", default=None, help="comma-separated decode batch sizes")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--prefill", choices=("synthetic", "real"), default="synthetic")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument(
        "--cuda-graph-max-tokens",
        type=int,
        default=None,
        help="steps up to this many tokens from CUDA graphs (default: the engine's; 0: eager)",
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.device = "cpu" if smoke else "cuda"
    args.dtype = "float32" if smoke else "bfloat16"
    args.num_pages = 512 if smoke else None
    args.layouts = [
        tuple(int(x) for x in item.split("x"))
        for item in (args.layouts or ("1x1,1x2" if smoke else "1x1,1x2,2x1,2x2,1x4")).split(",")
    ]
    contexts = args.contexts or ("48,200" if smoke else "32768,131072,1048576")
    args.contexts = [int(x) for x in contexts.split(",")]
    args.batches = [int(x) for x in (args.batches or ("1,2" if smoke else "1,8")).split(",")]
    args.steps = args.steps or (3 if smoke else 20)
    if smoke:
        args.warmup, args.profile_steps, args.max_num_batched_tokens = 1, 1, 256
    return args


def result_path(args: argparse.Namespace) -> str:
    name = "smoke-cpu" if args.smoke else torch.cuda.get_device_name().replace(" ", "_")
    layouts = "-".join(f"tp{tp}xsp{sp}" for tp, sp in args.layouts)
    return os.path.join(args.out, f"engine-{name}-{layouts}.json")


async def main(args: argparse.Namespace) -> dict:
    import ray

    began = time.perf_counter()
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    layouts = [(tp, sp) for tp, sp in args.layouts if args.device == "cpu" or tp * sp <= available]
    if any(tp * sp > 1 for tp, sp in layouts) and not ray.is_initialized():
        ray.init(
            num_cpus=max(4, max(tp * sp for tp, sp in layouts)) if args.device == "cpu" else None,
            include_dashboard=False,
            log_to_driver=False,
        )
    kernels = attention_kernel_names()
    report = {
        "benchmark": "engine decode",
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "device": args.device,
        "machine": machine(),
        "dtype": args.dtype,
        "context": args.prefill,
        "model": "tiny" if args.smoke else "m3_proxy (4 layers: 1 dense + 3 MSA/MoE, 8 experts)",
        "weights": "random, drawn on each shard's device (random_init='device')",
        "contexts": args.contexts,
        "batches": args.batches,
        "steps": args.steps,
        "warmup": args.warmup,
        "profile_steps": args.profile_steps,
        "attention_kernel_names": sorted(kernels),
        "layouts": [],
        "complete": False,
    }
    path = result_path(args)
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - began
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    for tp, sp in layouts:
        report["layouts"].append({"layout": f"{tp}x{sp}", "results": []})
        await bench_layout(args, tp, sp, kernels, report["layouts"][-1], save)
        save()
    report["complete"] = True
    save()
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
