"""What Ray Serve costs on top of the engine: TTFT, inter-token latency and output tokens/s at 1, 8
and 32 concurrent streams, measured directly on an ``MSAEngine`` in this process and through the
Serve app (HTTP, streaming /v1/completions) with the same engine config and the same requests.

Both engines are up for the whole run (each with a small KV cache) and the paths take turns:
``--rounds`` rounds, each running every level on both paths, the order alternating per round. The
report gives per path and level the median over the rounds, so a drift of the machine's speed
during the run reaches both paths alike. (When the direct engine itself needs GPUs through Ray,
shard actors that Serve's engine would also claim, the runs go direct, Serve, direct instead.)
Every level also reports what the engine's steps did (count, busy fraction, ms per step, tokens
per step), from ``Engine.stats()`` directly and from ``/metrics`` through Serve: a path whose
steps take longer is slowed inside the engine's process, one whose engine idles is slowed on the
way.

    python benchmarks/serve.py --preset tiny                       # CPU, writes serve-cpu-tiny.json
    python benchmarks/serve.py --model /models/MiniMax-M3 --tp 4 --sp 2 --device cuda

The HTTP client is aiohttp, as in vLLM's serving benchmark. By default it connects to the replica's
own HTTP server (``--ingress replica``: Ray Serve's throughput-optimized direct ingress, as ``msa
serve`` runs); ``--ingress proxy`` goes through Serve's HTTP proxy instead. With ``--api-servers N``
the engine has N API-server replicas, and the client sends its requests to their ports in turn (as
a load balancer in front of them would).

Every request has a fixed token-id prompt and generates exactly ``--max-tokens`` tokens
(``ignore_eos``), with ``logprobs=0`` so each token is one streamed chunk on both paths. Before any
timing, one greedy request must give the same text on every path, or no speed is reported.
Targets: Serve adds at most 20 ms to median TTFT and costs at most 5% of output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msa.cluster.engine import MSAEngine  # noqa: E402
from msa.cluster.protocol import SamplingParams  # noqa: E402
from msa.cluster.shard import free_port  # noqa: E402
from msa.serve.config import ServeConfig  # noqa: E402
from msa.serve.ingress import direct_ingress, replica_http_ports, replica_ingress_env  # noqa: E402

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

async def http_stream(client: aiohttp.ClientSession, model: str, prompt: list[int], args) -> StreamTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 1.0, "seed": 1,
            "ignore_eos": True, "logprobs": 0, "stream": True}
    timing = StreamTiming(start=time.perf_counter())
    async with client.post("/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:  # one SSE line at a time
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            tokens = len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
            if tokens:
                timing.add(now, tokens)
    return timing


async def http_greedy_text(
    client: aiohttp.ClientSession, model: str, prompt: list[int], max_tokens: int
) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}
    async with client.post("/v1/completions", json=body) as response:
        response.raise_for_status()
        return (await response.json())["choices"][0]["text"]


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


@dataclass
class Route:
    """One way to reach an engine: ``one_stream(name, prompt)`` streams a request and times it,
    ``counters()`` reads the engine's step counters (``STEP_COUNTERS``), ``greedy(prompt)`` gives
    one greedy completion's text."""

    name: str
    one_stream: object
    counters: object
    greedy: object


def engine_path(name: str, engine: MSAEngine, args) -> Route:
    """Drive ``engine`` directly, without HTTP."""

    async def counters() -> dict:
        stats = engine.stats()
        return {k: getattr(stats, k) for k in STEP_COUNTERS}

    return Route(name, lambda rid, prompt: engine_stream(engine, rid, prompt, args), counters,
                lambda prompt: engine_greedy_text(engine, prompt, args.max_tokens))


async def scrape_step_counters(clients: list[aiohttp.ClientSession]) -> dict:
    """The engine's step counters from the server's /metrics (``msa_engine_*_total``), and the sums
    and counts of the replicas' own TTFT and queue-time histograms. API servers have histograms
    of their own (summed) and the one engine's counters as of the latest message it sent them
    (the highest are the freshest)."""
    names = {"msa_engine_steps_total": "steps", "msa_engine_step_seconds_total": "step_seconds",
             'msa_engine_tokens_total{kind="decode"': "decode_tokens",
             'msa_engine_tokens_total{kind="prefill"': "prefill_tokens",
             "msa_time_to_first_token_seconds_sum": "ttft_sum", "msa_time_to_first_token_seconds_count":
             "ttft_count", "msa_request_queue_time_seconds_sum": "queue_sum",
             "msa_request_queue_time_seconds_count": "queue_count"}
    found: dict[str, float] = {}
    for client in clients:
        async with client.get("/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            for prefix, key in names.items():
                if line.startswith(prefix):
                    value = float(line.split()[-1])
                    own = key.startswith(("ttft", "queue"))
                    found[key] = found.get(key, 0.0) + value if own else max(found.get(key, 0.0), value)
    return found


def serve_path(clients: list[aiohttp.ClientSession], model: str, args) -> Route:
    """Through Serve; with several API servers each request goes to the next one's port."""
    turn = itertools.count()

    def one_stream(rid: str, prompt: list[int]):
        return http_stream(clients[next(turn) % len(clients)], model, prompt, args)

    return Route("serve", one_stream, lambda: scrape_step_counters(clients),
                lambda prompt: http_greedy_text(clients[0], model, prompt, args.max_tokens))


def process_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (the client, and the direct engine)
    and by Serve's processes on this node: its HTTP proxy, the replica, the engine process."""
    import psutil

    roles = {"ProxyActor": "serve_proxy", "ServeReplica": "serve_replica", "EngineCore": "serve_engine"}
    used = {"driver": sum(psutil.Process().cpu_times()[:2])}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        line = " ".join(proc.info["cmdline"] or [])
        for marker, role in roles.items():
            if marker in line and proc.info["cpu_times"] is not None:
                used[role] = used.get(role, 0.0) + sum(proc.info["cpu_times"][:2])
    return used


def replica_means(before: dict, after: dict) -> dict:
    """The replica's own mean TTFT and queue time over a run, from its histograms' sums."""
    out = {}
    for key in ("ttft", "queue"):
        count = after.get(f"{key}_count", 0) - before.get(f"{key}_count", 0)
        if count:
            out[f"{key}_ms_mean"] = round(1e3 * (after[f"{key}_sum"] - before[f"{key}_sum"]) / count, 2)
    return out


async def measure(path: Route, level: int, rnd: int, args) -> dict:
    """One measured run of ``path`` at ``level`` streams: ``requests_per_stream`` requests each,
    with what each process's CPU did meanwhile (cores busy: CPU seconds / wall seconds)."""
    prompts = make_prompts(level * args.requests_per_stream, args.prompt_tokens)
    before, cpu_before = await path.counters(), process_cpu_seconds()
    result = await run_level(path.one_stream, prompts, level, f"{path.name}-r{rnd}-c{level}")
    cpu_after, after = process_cpu_seconds(), await path.counters()
    result["engine_steps"] = step_summary(before, after, result["wall_s"])
    if "ttft_count" in after:
        result["replica_measured"] = replica_means(before, after)
    result["cores_busy"] = {role: round((cpu_after[role] - cpu_before.get(role, 0.0)) / result["wall_s"], 2)
                            for role in cpu_after}
    print(f"round {rnd} {path.name:<24} c={level:>2}: {result}", flush=True)
    return result


async def run_rounds(paths: list[Route], args) -> dict[str, dict[int, list[dict]]]:
    """Every path at every level, ``rounds`` times, interleaved: round r runs each level on each
    path in turn (the order rotating every round), so slow drifts of the machine (host clocks,
    other load) reach every path alike instead of favouring whichever ran in the quiet minute."""
    runs: dict[str, dict[int, list[dict]]] = {p.name: {c: [] for c in args.concurrency} for p in paths}
    for level in args.concurrency:
        for path in paths:  # warm-up
            await run_level(path.one_stream, make_prompts(level, args.prompt_tokens), level,
                            f"{path.name}-warm{level}")
    for rnd in range(args.rounds):
        for level in args.concurrency:
            shift = rnd % len(paths)
            for path in paths[shift:] + paths[:shift]:
                runs[path.name][level].append(await measure(path, level, rnd, args))
    return runs


def median_run(runs: list[dict]) -> dict:
    """Per figure, the median over the rounds (the step summary, the replica's own means and the
    CPU figures: of the run with median throughput)."""
    figures = ("wall_s", "ttft_ms_median", "ttft_ms_p90", "itl_ms_median", "itl_ms_p90",
               "output_tokens_per_s")
    out = {k: round(statistics.median(r[k] for r in runs), 2) for k in figures}
    by_rate = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    middle = by_rate[len(by_rate) // 2]
    for key in ("engine_steps", "replica_measured", "cores_busy"):
        if key in middle:
            out[key] = middle[key]
    out["rounds"] = len(runs)
    return out


def init_ray(device: str) -> None:
    import ray

    if not ray.is_initialized():
        local_cpu = device == "cpu" and not os.environ.get("RAY_ADDRESS")
        ray.init(include_dashboard=False, **({"num_cpus": 4} if local_cpu else {}))


def start_serve(config_args: dict) -> tuple[list[str], str]:
    """Serve the app; the base URLs the client sends to (the replicas' own, or the proxy's)."""
    from ray import serve

    from msa.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config_args), name="msa-bench", route_prefix="/")
    # With direct ingress the replicas serve HTTP themselves; the client goes there.
    ports = replica_http_ports("msa-bench") if direct_ingress() else [port]
    return [f"http://127.0.0.1:{p}" for p in ports], ServeConfig.from_args(config_args).model_name


def compare(engine: dict, served: dict) -> dict:
    added = served["ttft_ms_median"] - engine["ttft_ms_median"]
    loss = 1.0 - served["output_tokens_per_s"] / engine["output_tokens_per_s"]
    return {"ttft_ms_added_median": round(added, 2), "throughput_loss": round(loss, 4),
            "meets_ttft_target": added <= TTFT_BUDGET_MS,
            "meets_throughput_target": loss <= THROUGHPUT_LOSS_BUDGET}


@contextlib.asynccontextmanager
async def open_routes(names: tuple[str, ...], config: ServeConfig, config_args: dict, args):
    """Start the engines behind ``names`` ("engine": the direct one, "serve": the Serve app) and
    yield their routes; stop them on the way out."""
    engine, clients, routes = None, [], []
    try:
        if "engine" in names:
            engine = MSAEngine(config.engine_config())
            await engine.start()
            routes.append(engine_path("engine", engine, args))
        if "serve" in names:
            base_urls, served_name = start_serve(config_args)
            clients = [
                aiohttp.ClientSession(
                    base_url=base_url,
                    timeout=aiohttp.ClientTimeout(total=600),
                    connector=aiohttp.TCPConnector(limit=max(args.concurrency) + 4),
                )
                for base_url in base_urls
            ]
            routes.append(serve_path(clients, served_name, args))
        yield routes
    finally:
        if engine is not None:
            await engine.shutdown()
        for client in clients:
            await client.close()
        if "serve" in names:
            from ray import serve

            serve.shutdown()


async def bench(config: ServeConfig, config_args: dict, args) -> tuple[dict, dict[str, str]]:
    """The direct engine and Serve up at once (each with a small KV cache), taking turns. When the
    direct engine needs GPUs through Ray itself (shard actors), which Serve's engine holds, they run
    one after the other instead: direct, Serve, direct, each for every round."""
    engine_config = config.engine_config()
    shares_gpus = config.device == "cuda" and (engine_config.ray_shards or engine_config.world_size > 1)
    phases = [("engine",), ("serve",), ("engine",)] if shares_gpus else [("engine", "serve")]
    runs: dict[str, dict[int, list[dict]]] = {}
    texts: dict[str, str] = {}
    prompt = make_prompts(1, args.prompt_tokens)[0]
    for names in phases:
        async with open_routes(names, config, config_args, args) as routes:
            for route in routes:
                texts[route.name] = await route.greedy(prompt)
            if len(set(texts.values())) > 1:
                return {}, texts
            for name, by_level in (await run_rounds(routes, args)).items():
                for level, level_runs in by_level.items():
                    runs.setdefault(name, {}).setdefault(level, []).extend(level_runs)
    return runs, texts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model preset (tiny, m3_proxy, m3)")
    p.add_argument("--model", default=None, help="checkpoint directory (instead of --preset)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pages per engine (default 1024 on CUDA, where the engines share the GPU; "
                        "4096 on CPU)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="measured runs per path and level, interleaved")
    p.add_argument("--shards", choices=("auto", "actor", "replica"), default="auto",
                   help="where a single shard runs: in the engine's process (auto, replica) or an actor")
    p.add_argument("--engine-process", choices=("auto", "on", "off"), default="auto",
                   help="Serve's engine in an actor of its own (on) or in the replica (off); auto: GPUs on")
    p.add_argument("--ingress", choices=("replica", "proxy"), default="replica",
                   help="where the client connects: the replica's own HTTP server (Ray Serve's "
                        "throughput-optimized direct ingress, as `msa serve` runs) or Serve's HTTP proxy")
    p.add_argument("--api-servers", type=int, default=1,
                   help="API-server replicas of Serve's engine (msa serve --api-servers)")
    p.add_argument("--engine-cpus", type=float, default=None,
                   help="CPUs (Ray resources, and so torch threads) of Serve's engine process or replica")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/serve-<device>-<model>.json")
    args = p.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or args.preset or "tiny"
    config_args = {"model": model, "tp": args.tp, "sp": args.sp, "device": device,
                   "max_num_seqs": max(64, max(args.concurrency)), "max_waiting": 4096,
                   # Room for every stream's prompt and output at once; a fixed size lets the
                   # engines of all paths hold the GPU together.
                   "num_pages": args.num_pages or (1024 if device == "cuda" else 4096)}
    config_args["engine"] = {}
    if args.api_servers > 1:
        config_args["api_servers"] = args.api_servers
    if device == "cuda":
        config_args["engine"]["random_init"] = "device"  # a preset's weights drawn on the GPU
    if args.engine_process != "auto":
        config_args["engine_process"] = args.engine_process == "on"
    if args.shards != "auto":
        config_args["engine"]["ray_shards"] = args.shards == "actor"
    if args.engine_cpus is not None:
        config_args["replica_num_cpus"] = args.engine_cpus
    elif device == "cpu":
        # Ray gives an actor OMP_NUM_THREADS = its num_cpus; match the threads torch uses here.
        config_args["replica_num_cpus"] = float(torch.get_num_threads())
    config = ServeConfig.from_args(config_args)

    if args.ingress == "replica" and not os.environ.get("RAY_ADDRESS"):
        replicas = config.deployment_replicas
        os.environ.update(replica_ingress_env(free_port(count=replicas), replicas))
    load = {"before": os.getloadavg()[0]}
    init_ray(device)
    runs, texts = asyncio.run(bench(config, config_args, args))
    load["after"] = os.getloadavg()[0]

    out = args.out or ROOT / "benchmarks" / "results" / f"serve-{device}-{Path(model).name}.json"
    report = {
        "benchmark": "serve overhead: Ray Serve HTTP streaming vs the same engine driven in-process, "
                     f"{args.rounds} interleaved rounds per path and level, medians over the rounds",
        "engine_shards": "Ray actor" if config.engine_config().ray_shards else "in the driving process",
        # Ray Serve's own switches (RAY_SERVE_THROUGHPUT_OPTIMIZED, ...) as this run had them.
        "serve_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")},
        "client": f"aiohttp {aiohttp.__version__}",
        "serve_ingress": "the replica's own HTTP server (direct ingress)" if direct_ingress()
        else "Serve's HTTP proxy",
        "serve_engine": "its own Ray actor process (RemoteEngine)" if config.runs_engine_process
        else "in the replica's process",
        "api_servers": config.api_servers,
        "numbers": f"{device.upper()} numbers" + (" (tiny preset, random weights; not GPU performance)"
                                                  if device == "cpu" else ""),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    # 1-minute load average: other work on the machine skews every path's numbers.
                    "load_average_1m": load},
        "config": {**config_args, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                   "max_num_batched_tokens": config.engine_config().max_num_batched_tokens,
                   "requests_per_stream": args.requests_per_stream, "rounds": args.rounds},
        "targets": {"ttft_ms_added_median_max": TTFT_BUDGET_MS,
                    "throughput_loss_max": THROUGHPUT_LOSS_BUDGET},
        "correctness": {"greedy_text_equal": len(set(texts.values())) == 1},
    }
    if not runs:
        report["error"] = f"greedy outputs differ between the paths ({texts}); no speed is reported"
        print(report["error"], file=sys.stderr)
    else:
        report["levels"] = []
        for c in args.concurrency:
            level = {"concurrency": c, **{name: median_run(by_level[c]) for name, by_level in runs.items()}}
            level.update(compare(level["engine"], level["serve"]))
            level["runs"] = {name: by_level[c] for name, by_level in runs.items()}
            report["levels"].append(level)
            print(f"c={c:>2}: serve adds {level['ttft_ms_added_median']} ms TTFT, "
                  f"costs {100 * level['throughput_loss']:.1f}% tokens/s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
