"""What Ray Serve costs on top of the engine: TTFT, inter-token latency and output tokens/s at 1, 8
and 32 concurrent streams, measured directly on an ``MSAEngine`` in this process and through the
Serve app (HTTP, streaming /v1/completions) with the same engine config and the same requests.
The direct engine runs before and after Serve; each level compares Serve with the faster run. With
``--shards actor`` the engine is also measured with its single shard in this process, and Serve is
compared against both. When Serve runs its engine in an actor of its own (GPUs), that actor is also
driven from here without HTTP, which splits Serve's cost into the process boundary and the rest.
Every level reports what the engine's steps did (count, busy fraction, tokens per step), read from
``Engine.stats()`` directly and from ``/metrics`` through Serve.

    python benchmarks/serve.py --preset tiny                       # CPU, writes serve-cpu-tiny.json
    python benchmarks/serve.py --model /models/MiniMax-M3 --tp 4 --sp 2 --device cuda

Every request has a fixed token-id prompt and generates exactly ``--max-tokens`` tokens
(``ignore_eos``), with ``logprobs=0`` so each token is one streamed chunk on both paths. Before any
timing, one greedy request must give the same text on both paths, or no speed is reported.
Targets: Serve adds at most 20 ms to median TTFT and costs at most 5% of output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msa.cluster.engine import MSAEngine  # noqa: E402
from msa.cluster.protocol import SamplingParams  # noqa: E402
from msa.cluster.remote import RemoteEngine  # noqa: E402
from msa.serve.config import ServeConfig  # noqa: E402

TTFT_BUDGET_MS = 20.0
THROUGHPUT_LOSS_BUDGET = 0.05


@dataclass
class StreamTiming:
    start: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    last: float = 0.0

    def add(self, now: float, tokens: int) -> None:
        """An output of ``tokens`` tokens arrived: the first sets the TTFT; later ones give each of
        their tokens an equal share of the gap (outputs carry several tokens when the reader fell
        behind the engine)."""
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.gaps += [(now - self.last) / tokens] * tokens
        self.tokens += tokens
        self.last = now


def summarize(timings: list[StreamTiming], wall: float) -> dict:
    ttfts = sorted(t.ttft * 1e3 for t in timings)
    gaps = sorted(g * 1e3 for t in timings for g in t.gaps)
    tokens = sum(t.tokens for t in timings)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"requests": len(timings), "output_tokens": tokens, "wall_s": round(wall, 3),
            "ttft_ms_median": round(statistics.median(ttfts), 2), "ttft_ms_p90": round(pct(ttfts, 0.9), 2),
            "itl_ms_median": round(statistics.median(gaps), 2) if gaps else None,
            "itl_ms_p90": round(pct(gaps, 0.9), 2) if gaps else None,
            "output_tokens_per_s": round(tokens / wall, 1)}


def make_prompts(count: int, length: int, vocab: int = 256) -> list[list[int]]:
    return [[(31 * i + 7 * j + 3) % vocab for j in range(length)] for i in range(count)]


# Direct: the engine in this process -------------------------------------------------------------

async def engine_stream(engine: MSAEngine, request_id: str, prompt: list[int], args) -> StreamTiming:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=1, ignore_eos=True, logprobs=0)
    timing = StreamTiming(start=time.perf_counter())
    async for out in engine.generate(request_id, prompt, params):
        if out.token_ids:
            timing.add(time.perf_counter(), len(out.token_ids))
    return timing


async def engine_greedy_text(engine: MSAEngine, prompt: list[int], max_tokens: int) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return "".join([out.text async for out in engine.generate("check", prompt, params)])


# Through Serve: HTTP streaming --------------------------------------------------------------------

async def http_stream(client: httpx.AsyncClient, model: str, prompt: list[int], args) -> StreamTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 1.0, "seed": 1,
            "ignore_eos": True, "logprobs": 0, "stream": True}
    timing = StreamTiming(start=time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            tokens = len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
            if tokens:
                timing.add(now, tokens)
    return timing


async def http_greedy_text(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


# Driver -----------------------------------------------------------------------------------------

async def run_level(one_stream, prompts: list[list[int]], concurrency: int, tag: str) -> dict:
    """Closed loop: ``concurrency`` workers send the prompts back to back; ``one_stream(name, prompt)``."""
    queue = list(enumerate(prompts))
    timings: list[StreamTiming] = []

    async def worker() -> None:
        while queue:
            i, prompt = queue.pop()
            timings.append(await one_stream(f"{tag}-{i}", prompt))

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return summarize(timings, time.perf_counter() - start)


STEP_COUNTERS = ("steps", "step_seconds", "decode_tokens", "prefill_tokens")


def step_summary(before: dict, after: dict, wall: float) -> dict:
    """What the engine's steps did during a level: how many, how busy it was (the rest of the wall
    time it had no work), and how many tokens a step carried."""
    d = {k: after[k] - before[k] for k in STEP_COUNTERS}
    steps = max(d["steps"], 1)
    return {"steps": int(d["steps"]), "busy_fraction": round(d["step_seconds"] / wall, 3),
            "ms_per_step": round(1e3 * d["step_seconds"] / steps, 2),
            "decode_tokens_per_step": round(d["decode_tokens"] / steps, 2),
            "prefill_tokens": int(d["prefill_tokens"])}


async def run_levels(one_stream, counters, args, label: str) -> dict:
    """Per concurrency level: one warm-up round, then ``requests_per_stream`` requests per stream.
    ``counters()`` reads the engine's step counters (``STEP_COUNTERS``) before and after."""
    results = {}
    for level in args.concurrency:
        await run_level(one_stream, make_prompts(level, args.prompt_tokens), level, f"warm{level}")
        prompts = make_prompts(level * args.requests_per_stream, args.prompt_tokens)
        before = await counters()
        results[level] = await run_level(one_stream, prompts, level, f"c{level}")
        results[level]["engine_steps"] = step_summary(before, await counters(), results[level]["wall_s"])
        print(f"{label:<6} c={level:>2}: {results[level]}", flush=True)
    return results


async def bench_engine(engine: MSAEngine | RemoteEngine, args, label: str) -> tuple[dict, str]:
    """Drive ``engine`` (in this process, or in its actor) directly, without HTTP."""
    await engine.start()

    async def counters() -> dict:
        stats = engine.stats()
        return {k: getattr(stats, k) for k in STEP_COUNTERS}

    try:
        check = await engine_greedy_text(engine, make_prompts(1, args.prompt_tokens)[0], args.max_tokens)
        one = lambda name, prompt: engine_stream(engine, name, prompt, args)
        results = await run_levels(one, counters, args, label)
        return results, check
    finally:
        await engine.shutdown()


async def scrape_step_counters(client: httpx.AsyncClient) -> dict:
    """The engine's step counters from the server's /metrics (``msa_engine_*_total``)."""
    names = {"msa_engine_steps_total": "steps", "msa_engine_step_seconds_total": "step_seconds",
             'msa_engine_tokens_total{kind="decode"': "decode_tokens",
             'msa_engine_tokens_total{kind="prefill"': "prefill_tokens"}
    text = (await client.get("/metrics")).text
    found = {}
    for line in text.splitlines():
        for prefix, key in names.items():
            if line.startswith(prefix):
                found[key] = float(line.split()[-1])
    return found


async def bench_serve(base_url: str, model: str, args) -> tuple[dict, str]:
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        check = await http_greedy_text(client, model, make_prompts(1, args.prompt_tokens)[0], args.max_tokens)
        one = lambda name, prompt: http_stream(client, model, prompt, args)
        results = await run_levels(one, lambda: scrape_step_counters(client), args, "serve")
        return results, check


def init_ray(device: str) -> None:
    import ray

    if not ray.is_initialized():
        local_cpu = device == "cpu" and not os.environ.get("RAY_ADDRESS")
        ray.init(include_dashboard=False, **({"num_cpus": 4} if local_cpu else {}))


def start_serve(config_args: dict, device: str) -> tuple[str, str]:
    from ray import serve

    from msa.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(device)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config_args), name="msa-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", ServeConfig.from_args(config_args).model_name


def wait_for_free_gpu_memory(device: str, free_before: int, timeout_s: float = 60.0) -> None:
    """Until the stopped Serve replica's engine process has given its GPU memory back."""
    deadline = time.monotonic() + timeout_s
    while device == "cuda" and torch.cuda.mem_get_info()[0] < 0.95 * free_before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Serve engine's GPU memory was not released within {timeout_s} s")
        time.sleep(0.5)


def compare(engine: dict, served: dict) -> dict:
    added = served["ttft_ms_median"] - engine["ttft_ms_median"]
    loss = 1.0 - served["output_tokens_per_s"] / engine["output_tokens_per_s"]
    return {"ttft_ms_added_median": round(added, 2), "throughput_loss": round(loss, 4),
            "meets_ttft_target": added <= TTFT_BUDGET_MS,
            "meets_throughput_target": loss <= THROUGHPUT_LOSS_BUDGET}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model preset (tiny, m3_proxy, m3)")
    p.add_argument("--model", default=None, help="checkpoint directory (instead of --preset)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--shards", choices=("auto", "actor", "replica"), default="auto",
                   help="where a single shard runs: in the engine's process (auto, replica) or an actor")
    p.add_argument("--engine-process", choices=("auto", "on", "off"), default="auto",
                   help="Serve's engine in an actor of its own (on) or in the replica (off); auto: GPUs on")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/serve-<device>-<model>.json")
    args = p.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or args.preset or "tiny"
    config_args = {"model": model, "tp": args.tp, "sp": args.sp, "device": device,
                   "max_num_seqs": max(64, max(args.concurrency)), "max_waiting": 4096}
    if args.num_pages is not None or device == "cpu":
        # On the CPU the cache is sized by pages: room for every stream's prompt and output at once.
        config_args["num_pages"] = args.num_pages or 4096
    config_args["engine"] = {}
    if device == "cuda":
        config_args["engine"]["random_init"] = "device"  # a preset's weights drawn on the GPU
    if args.engine_process != "auto":
        config_args["engine_process"] = args.engine_process == "on"
    if args.shards != "auto":
        config_args["engine"]["ray_shards"] = args.shards == "actor"
    if device == "cpu":
        # Ray gives an actor OMP_NUM_THREADS = its num_cpus; match the threads torch uses here.
        config_args["replica_num_cpus"] = float(torch.get_num_threads())
    config = ServeConfig.from_args(config_args)

    load = {"before": os.getloadavg()[0]}
    init_ray(device)  # shard actors need it
    engine_config = config.engine_config()
    engine_results, engine_text = asyncio.run(bench_engine(MSAEngine(engine_config), args, "engine"))
    in_process = None
    if engine_config.ray_shards and engine_config.world_size == 1:
        local = dataclasses.replace(engine_config, ray_shards=False)
        in_process, _ = asyncio.run(bench_engine(MSAEngine(local), args, "engine in process"))
    load["after_engine"] = os.getloadavg()[0]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the engine actor and the Serve replica that run next need this memory
    free_before = torch.cuda.mem_get_info()[0] if device == "cuda" else 0
    actor_results = None
    if config.runs_engine_process:
        # The engine in its actor, driven from here without HTTP: the process boundary's own cost.
        remote = RemoteEngine(engine_config, config.engine_actor_options())
        actor_results, actor_text = asyncio.run(bench_engine(remote, args, "actor"))
        if actor_text != engine_text:
            raise RuntimeError("greedy outputs differ between the engine and its actor")
        wait_for_free_gpu_memory(device, free_before)
    base_url, served_name = start_serve(config_args, device)
    try:
        serve_results, serve_text = asyncio.run(bench_serve(base_url, served_name, args))
    finally:
        from ray import serve

        serve.shutdown()
    load["after_serve"] = os.getloadavg()[0]
    # The direct engine once more, after Serve: the baseline of each level is the faster of its two
    # runs (the first one may have shared the machine with Ray's start-up).
    wait_for_free_gpu_memory(device, free_before)
    engine_again, _ = asyncio.run(bench_engine(MSAEngine(engine_config), args, "engine"))
    engine_first = engine_results
    engine_results = {c: max(engine_first[c], engine_again[c], key=lambda r: r["output_tokens_per_s"])
                      for c in args.concurrency}

    out = args.out or ROOT / "benchmarks" / "results" / f"serve-{device}-{Path(model).name}.json"
    report = {
        "benchmark": "serve overhead: Ray Serve HTTP streaming vs the same engine driven in-process "
                     "(per level the faster of two direct runs, one before and one after Serve)",
        "engine_shards": "Ray actor" if engine_config.ray_shards else "in the driving process",
        "serve_engine": "its own Ray actor process (RemoteEngine)" if config.runs_engine_process
        else "in the replica's process",
        "numbers": f"{device.upper()} numbers" + (" (tiny preset, random weights; not GPU performance)"
                                                  if device == "cpu" else ""),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    # 1-minute load average: other work on the machine skews both paths' numbers.
                    "load_average_1m": load},
        "config": {**config_args, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                   "requests_per_stream": args.requests_per_stream},
        "targets": {"ttft_ms_added_median_max": TTFT_BUDGET_MS,
                    "throughput_loss_max": THROUGHPUT_LOSS_BUDGET},
        "correctness": {"greedy_text_equal": engine_text == serve_text},
    }
    if engine_text != serve_text:
        report["error"] = "greedy outputs differ between the engine and Serve; no speed is reported"
        print(report["error"], file=sys.stderr)
    else:
        report["levels"] = [{"concurrency": c, "engine": engine_results[c], "serve": serve_results[c],
                             **compare(engine_results[c], serve_results[c]),
                             "engine_runs": [engine_first[c], engine_again[c]]} for c in args.concurrency]
        if actor_results is not None:
            # The engine actor without HTTP against the direct engine, and Serve against it.
            for level in report["levels"]:
                c = level["concurrency"]
                level["engine_actor"] = actor_results[c]
                level["engine_actor_vs_engine"] = compare(engine_results[c], actor_results[c])
                level["serve_vs_engine_actor"] = compare(actor_results[c], serve_results[c])
        if in_process is not None:
            # The same comparison against the single shard run in the driving process.
            for level in report["levels"]:
                c = level["concurrency"]
                level["engine_shard_in_process"] = in_process[c]
                level["vs_shard_in_process"] = compare(in_process[c], serve_results[c])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if engine_text == serve_text else 1


if __name__ == "__main__":
    sys.exit(main())
