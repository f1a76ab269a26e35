"""Decode speed of the engine at long context on 1, 2 and 4 GPUs, dense attention vs MSA.

For each layout (tp x sp shards) and each attention kind (the m3_proxy model with MSA on its
sparse layers, and the same shapes with dense attention on every layer) it measures, per context
length and batch size: decode tokens/s, time per output token, and the share of the decode step
spent in the attention kernels (indexer, sparse/dense paged attention, LSE merge; from
torch.profiler's device-kernel times on rank 0). The context is synthetic by default: the KV pages
hold random values and decoding starts at position ``context`` (decode cost does not depend on
the cached values; ``--prefill real`` prefills real prompts through the engine instead).

Before a layout is timed, the engine on that layout must reproduce single-process greedy tokens of
the tiny model; a layout that fails gets no speed. Writes
``benchmarks/results/engine-<device>-<layouts>.json``.

    python benchmarks/engine.py                       # GPUs: 32K, 128K, 1M on 1, 2, 4 GPUs
    python benchmarks/engine.py --layouts 2x2         # one layout (each builds m3_proxy twice)
    python benchmarks/engine.py --smoke               # CPU dry run with tiny shapes
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msa.cluster.block_manager import BlockManager, blocks_on_shard  # noqa: E402
from msa.cluster.engine import EngineConfig, MSAEngine  # noqa: E402
from msa.cluster.protocol import SamplingParams  # noqa: E402
from msa.cluster.scheduler import Scheduler  # noqa: E402
from msa.cluster.sequence import Sequence, SequenceStatus  # noqa: E402
from msa.model.generate import generate_stream  # noqa: E402
from msa.platform.checkpoint import load_model  # noqa: E402
from msa.platform.config import ModelConfig, m3_proxy, tiny  # noqa: E402

ATTENTION_KERNEL_MODULES = ("msa.kernels.indexer.triton", "msa.kernels.sparse_attention.triton",
                            "msa.kernels.dense_attention.triton", "msa.kernels.merge.triton")


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


def model_config(args: argparse.Namespace, attention: str) -> ModelConfig:
    config = tiny() if args.smoke else m3_proxy()
    if attention == "dense":
        config = dataclasses.replace(config, sparse_attention_freq=[0] * config.num_hidden_layers)
    return config


def engine_config(args: argparse.Namespace, model: ModelConfig | str, tp: int, sp: int, **kw) -> EngineConfig:
    base = dict(model=model, tp=tp, sp=sp, device=args.device, dtype=args.dtype, seed=0,
                max_num_seqs=max(args.batches + [8]), max_num_batched_tokens=args.max_num_batched_tokens,
                num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization,
                step_timeout_s=600.0)
    return EngineConfig(**{**base, **kw})


async def check_layout(args: argparse.Namespace, tp: int, sp: int) -> dict:
    """Greedy tokens of the tiny model on this layout vs the single process, in fp32."""
    lengths, max_tokens = [5, 41, 77], 6
    engine = MSAEngine(engine_config(args, "tiny", tp, sp, dtype="float32", num_pages=256,
                                     max_num_batched_tokens=256))
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


def adopt_synthetic_context(scheduler: Scheduler, seq: Sequence, total_tokens: int) -> None:
    """Make ``seq`` a running decode whose first ``num_tokens - 1`` tokens count as cached (their
    pages hold the random values written by fill_cache_random)."""
    scheduler.block_manager.allocate(seq, total_tokens)
    seq.num_cached = seq.num_tokens - 1
    seq.status = SequenceStatus.RUNNING
    scheduler.running.append(seq)


async def decode_steps(engine: MSAEngine, context: int, batch: int, args: argparse.Namespace,
                       kernels: set[str]) -> dict:
    """Time ``args.steps`` decode steps of ``batch`` sequences at ``context`` tokens, then profile
    ``args.profile_steps`` more."""
    sp, block = engine.config.sp, engine.block_size
    pages = engine.scheduler.block_manager.num_pages
    total = context + args.warmup + args.steps + args.profile_steps + 1
    needed = batch * blocks_on_shard((total + block - 1) // block, 0, sp)
    if needed > pages:
        return {"skipped": f"needs {needed} KV pages per shard, {pages} fit"}
    scheduler = Scheduler(BlockManager(pages, sp, block), max_num_seqs=batch, max_num_batched_tokens=batch)
    rng = random.Random(context * 31 + batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True)
    prompts = [[rng.randrange(vocab) for _ in range(context)] for _ in range(batch)]
    seqs = [Sequence(f"b{i}", 0, p, params, 0, sp) for i, p in enumerate(prompts)]
    for seq in seqs:
        adopt_synthetic_context(scheduler, seq, total)
    by_id = {s.seq_id: s for s in seqs}
    times, profiles = [], []
    for step in range(args.warmup + args.steps + args.profile_steps):
        plan = scheduler.schedule()
        plan.profile = step >= args.warmup + args.steps
        start = time.perf_counter()
        result = await engine.executor.execute(plan)
        elapsed = time.perf_counter() - start
        if plan.profile:
            profiles.append(result.profile)
        elif step >= args.warmup:
            times.append(elapsed)
        scheduler.postprocess(plan, by_id, result.token_ids)
    return summarize(times, profiles, batch, kernels)


async def real_prefill_steps(engine: MSAEngine, context: int, batch: int, args: argparse.Namespace) -> dict:
    """Prefill real random prompts through ``generate`` and time the gaps between output tokens."""
    rng = random.Random(context * 31 + batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.warmup + args.steps + 1, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> list[float]:
        prompt = [rng.randrange(vocab) for _ in range(context)]
        stream = engine.generate(f"p{context}-{batch}-{i}", prompt, params)
        stamps = [time.perf_counter() async for _ in stream]
        return [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:], strict=False)]

    gaps = await asyncio.gather(*[one(i) for i in range(batch)])
    return summarize([statistics.mean(step) for step in zip(*gaps, strict=False)], [], batch, set())


def summarize(times: list[float], profiles: list[dict], batch: int, kernels: set[str]) -> dict:
    step_s = statistics.median(times)
    out = {"time_per_output_token_ms": step_s * 1e3, "decode_tokens_per_s": batch / statistics.mean(times),
           "steps_timed": len(times)}
    if profiles:
        per_kernel: dict[str, float] = {}
        for p in profiles:
            for name, us in p["device_kernels_us"].items():
                per_kernel[name] = per_kernel.get(name, 0.0) + us / len(profiles)
        attention_us = sum(us for name, us in per_kernel.items() if name in kernels)
        device_us = sum(per_kernel.values())
        out.update({
            "attention_kernels_ms_per_step": attention_us / 1e3,
            "attention_share_of_step": attention_us / 1e3 / (step_s * 1e3) if per_kernel else None,
            "attention_share_of_device_time": attention_us / device_us if device_us else None,
            "attention_kernels": sorted(name for name in per_kernel if name in kernels),
        })
    return out


async def bench_layout(args: argparse.Namespace, tp: int, sp: int, kernels: set[str]) -> dict:
    check = await check_layout(args, tp, sp)
    print(json.dumps({"layout": f"tp{tp}xsp{sp}", "check_passed": check["passed"]}), flush=True)
    row: dict = {"tp": tp, "sp": sp, "gpus": tp * sp, "check": check, "results": []}
    if not check["passed"]:
        return row
    for attention in ("dense", "msa"):
        engine = MSAEngine(engine_config(args, model_config(args, attention), tp, sp))
        await engine.start()
        try:
            if args.prefill == "synthetic":
                await engine.executor.fill_cache_random(seed=1)
            for context in args.contexts:
                for batch in args.batches:
                    if args.prefill == "synthetic":
                        res = await decode_steps(engine, context, batch, args, kernels)
                    else:
                        res = await real_prefill_steps(engine, context, batch, args)
                    res.update(attention=attention, context=context, batch=batch,
                               pages_per_shard=engine.scheduler.block_manager.num_pages)
                    print(json.dumps(res), flush=True)
                    row["results"].append(res)
        finally:
            await engine.shutdown()
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run: tiny model, short contexts, CPU actors")
    ap.add_argument("--layouts", default=None, help="tp x sp list, e.g. 1x1,1x2,2x1,2x2,1x4")
    ap.add_argument("--contexts", default=None, help="comma-separated context lengths")
    ap.add_argument("--batches", default=None, help="comma-separated decode batch sizes")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--prefill", choices=("synthetic", "real"), default="synthetic")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.device = "cpu" if smoke else "cuda"
    args.dtype = "float32" if smoke else "bfloat16"
    args.num_pages = 512 if smoke else None
    args.layouts = [tuple(int(x) for x in item.split("x"))
                    for item in (args.layouts or ("1x1,1x2" if smoke else "1x1,1x2,2x1,2x2,1x4")).split(",")]
    contexts = args.contexts or ("48,200" if smoke else "32768,131072,1048576")
    args.contexts = [int(x) for x in contexts.split(",")]
    args.batches = [int(x) for x in (args.batches or ("1,2" if smoke else "1,8")).split(",")]
    args.steps = args.steps or (3 if smoke else 20)
    if smoke:
        args.warmup, args.profile_steps, args.max_num_batched_tokens = 1, 1, 256
    return args


async def main(args: argparse.Namespace) -> dict:
    import ray

    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    layouts = [(tp, sp) for tp, sp in args.layouts if args.device == "cpu" or tp * sp <= available]
    if any(tp * sp > 1 for tp, sp in layouts) and not ray.is_initialized():
        ray.init(num_cpus=max(4, max(tp * sp for tp, sp in layouts)) if args.device == "cpu" else None,
                 include_dashboard=False, log_to_driver=False)
    kernels = attention_kernel_names()
    report = {
        "benchmark": "engine decode", "smoke": args.smoke, "device": args.device,
        "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                        else platform.processor() or "cpu"),
        "torch": torch.__version__, "dtype": args.dtype, "context": args.prefill,
        "model": "tiny" if args.smoke else "m3_proxy (4 layers: 1 dense + 3 MSA/MoE, 8 experts)",
        "contexts": args.contexts, "batches": args.batches, "steps": args.steps,
        "attention_kernel_names": sorted(kernels), "layouts": [],
    }
    for tp, sp in layouts:
        report["layouts"].append(await bench_layout(args, tp, sp, kernels))
    return report


if __name__ == "__main__":
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    os.makedirs(arguments.out, exist_ok=True)
    name = "smoke-cpu" if arguments.smoke else torch.cuda.get_device_name().replace(" ", "_")
    layouts = "-".join(f"tp{tp}xsp{sp}" for tp, sp in arguments.layouts)
    path = os.path.join(arguments.out, f"engine-{name}-{layouts}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
