"""Where an RL step's time goes: rollout, train and weight sync; weight-sync GB/s; GPU idle share.

    python benchmarks/rl.py --preset tiny --device cpu            # writes results/rl-cpu-tiny.json
    python benchmarks/rl.py --preset m3_proxy --experts 2 --vocab 32768 --device cuda \
        --prompts 16 --group-size 4 --max-tokens 128              # 2 GPUs: trainer + engine

Runs the real loop (``msa.rl.train``: engine rollouts, DeepSpeed trainer actors, weight sync
through the trainer -> engine weight group) for ``--warmup + --steps`` steps on the repeat-char
task and reports the timed steps. ``--layers/--experts/--vocab`` resize m3_proxy (random weights
written to a temporary checkpoint) so the sync moves a chosen number of bytes. Before timing, one
update is synced and the engine's log-probabilities must equal the trainer's on freshly generated
tokens (fp32: 1e-4, bf16: 0.1), or no number is reported. On GPUs the trainer and the engine
each take one GPU (a weight group cannot hold two ranks on one GPU).
Targets: weight sync >= 10 GB/s and <= 3% of the step time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from msa.cluster.engine import MSAEngine  # noqa: E402
from msa.cluster.protocol import SamplingParams  # noqa: E402
from msa.rl.batch import TrainSample  # noqa: E402
from msa.rl.config import RLConfig  # noqa: E402
from msa.rl.placement import TrainerGroup, runtime_env  # noqa: E402
from msa.rl.sync import WeightSync  # noqa: E402
from msa.rl.train import engine_config, train  # noqa: E402

SYNC_GBPS_TARGET = 10.0
SYNC_SHARE_TARGET = 0.03


def resized(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.layers, args.experts, args.vocab))


def model_name(args: argparse.Namespace) -> str:
    if not resized(args):
        return args.preset
    parts = [
        f"{k}{v}" for k, v in (("L", args.layers), ("E", args.experts), ("V", args.vocab)) if v is not None
    ]
    return "-".join([args.preset, *parts])


def model_source(args: argparse.Namespace, directory: Path) -> str:
    """The preset name, or a random-weight checkpoint of m3_proxy resized by --layers/--experts/--vocab."""
    if not resized(args):
        return args.preset
    if args.preset != "m3_proxy":
        raise SystemExit("--layers/--experts/--vocab resize the m3_proxy preset only")
    import torch

    from msa.model import MiniMaxM3ForCausalLM
    from msa.platform.checkpoint import save_checkpoint
    from msa.platform.config import m3_proxy

    config = m3_proxy(args.layers or 4, args.experts or 8)
    if args.vocab is not None:
        config = dataclasses.replace(config, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = MiniMaxM3ForCausalLM(config).to(torch.bfloat16)
    save_checkpoint(model, directory, config)
    return str(directory)


def run_config(args: argparse.Namespace, output_dir: str, source: str) -> RLConfig:
    cuda = args.device == "cuda"
    return RLConfig.from_dict(
        {
            "model": {"source": source, "device": args.device},
            "engine": {
                "num_pages": None if cuda else 512,
                "max_num_seqs": max(64, args.prompts * args.group_size),
                "max_num_batched_tokens": 16384 if cuda else 2048,
                "gpu_memory_utilization": 0.35,
                "weight_bucket_bytes": args.bucket_mb << 20,
            },
            "data": {"path": str(ROOT / "examples/data/repeat_char.jsonl")},
            "env": {"name": "repeat_char", "options": {"length": args.max_tokens}},
            "rollout": {
                "prompts_per_step": args.prompts,
                "group_size": args.group_size,
                "max_tokens": args.max_tokens,
                "max_concurrency": args.prompts * args.group_size,
            },
            "trainer": {"gpus_per_trainer": 1 if cuda else 0, "zero_stage": args.zero_stage, "lr": args.lr},
            "run": {"steps": args.warmup + args.steps, "output_dir": output_dir, "resume": False},
            "logging": {"wandb_mode": "disabled", "progress_bar": args.progress},
        }
    )


def bench_prompts(config: RLConfig) -> list[dict] | None:
    """None (the trainer reads the file through ``datasets``), or where ``datasets`` is not
    installed (the GPU image; its wheel with pyarrow would not fit the bundle carried there) the
    same jsonl rows read here."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        with open(config.data.path) as f:
            return [json.loads(line) for line in f if line.strip()]
    return None


def check_sync_correctness(config: RLConfig) -> float:
    """Largest |engine - trainer| log-probability over fresh tokens after a sync; raises if too large."""
    trainers = TrainerGroup(config)
    actor = trainers.actors[0]
    ray.get(actor.setup.remote(*ray.get(actor.address.remote())))

    async def main() -> float:
        engine = MSAEngine(engine_config(config))
        await engine.start()
        try:
            weights = WeightSync(engine, [actor], config.model.dtype)
            await weights.open()
            await weights.sync(1)
            prompt = engine.tokenizer.encode("Repeat the character a")
            params = SamplingParams(max_tokens=8, seed=0, ignore_eos=True, logprobs=0)
            tokens, engine_lps = [], []
            async for out in engine.generate("sync-check", prompt, params):
                tokens += out.token_ids
                engine_lps += out.logprobs
            sample = TrainSample(
                input_ids=prompt + tokens,
                loss_mask=[0] * len(prompt) + [1] * len(tokens),
                old_logprobs=[0.0] * (len(prompt) + len(tokens)),
                advantage=0.0,
            )
            trainer_lps = ray.get(actor.logprobs.remote([sample]))[0]
            return max(abs(a - b) for a, b in zip(engine_lps, trainer_lps, strict=True))
        finally:
            await engine.shutdown()

    try:
        error = asyncio.run(main())
    finally:
        trainers.shutdown()
    tolerance = 1e-4 if config.model.dtype == "float32" else 0.1
    if not error <= tolerance:
        raise SystemExit(
            f"engine and trainer disagree after weight sync by {error:.3g} (> {tolerance}); "
            "no timing is reported"
        )
    return error


def _nvidia_smi_utilization() -> list[float]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout
    return [float(line) for line in out.split()]


class GpuIdleSampler:
    """Samples GPU utilisation over all visible GPUs while running: NVML every 50 ms, or
    nvidia-smi (about every 0.1 s) where the image has no pynvml."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.source = "nvml"
            return lambda: [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
        except Exception:
            pass
        try:
            _nvidia_smi_utilization()
        except Exception:
            return None
        self.source = "nvidia-smi"
        return _nvidia_smi_utilization

    def start(self) -> bool:
        read = self._reader()
        if read is None:
            return False

        def loop() -> None:
            while not self._stop.wait(0.05):
                utils = read()
                self.samples.append(sum(utils) / len(utils))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return True

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return 1.0 - statistics.fmean(self.samples) / 100.0 if self.samples else None


def summarize(history: list[dict], warmup: int) -> dict:
    timed = history[warmup:]
    mean = lambda key: statistics.fmean(row[key] for row in timed)
    step, sync = mean("time/step"), mean("sync/seconds")
    return {
        "steps_timed": len(timed),
        "step_s": round(step, 4),
        "rollout_s": round(mean("time/rollout"), 4),
        "train_s": round(mean("time/train"), 4),
        "sync_s": round(sync, 4),
        "sync_send_s": round(mean("sync/send_seconds"), 4),
        "sync_buckets": int(mean("sync/buckets")),
        "sync_gb": round(mean("sync/gb"), 6),
        "sync_gbps": round(mean("sync/gbps"), 4),
        "sync_share_of_step": round(sync / step, 5),
        "per_step": [
            {k: round(row[k], 4) for k in ("time/step", "time/rollout", "time/train", "sync/seconds")}
            for row in timed
        ],
        # Every step's mean reward, warm-up included: the learning curve of the run.
        "reward_curve": [round(row["rollout/reward_mean"], 4) for row in history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="resize m3_proxy: decoder layers")
    parser.add_argument("--experts", type=int, default=None, help="resize m3_proxy: routed experts")
    parser.add_argument("--vocab", type=int, default=None, help="resize m3_proxy: vocabulary size")
    parser.add_argument("--bucket-mb", type=int, default=512, help="weight-sync bucket size (MiB)")
    parser.add_argument(
        "--lr", type=float, default=1e-5, help="learning rate (0.01 lets the tiny model learn)"
    )
    parser.add_argument("--progress", action="store_true", help="a progress bar per step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--label", default=None, help="machine name for the results (default: from the device)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            raise SystemExit("--device cuda needs 2 GPUs: one for the trainer, one for the engine shard")
    ray.init(runtime_env=runtime_env(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="msa-rl-bench-") as tmp:
        source = model_source(args, Path(tmp) / "model")
        config = run_config(args, str(Path(tmp) / "run"), source)
        sync_error = check_sync_correctness(config)
        sampler = GpuIdleSampler()
        sampling = sampler.start() if args.device == "cuda" else False
        wall = time.perf_counter()
        summary = asyncio.run(train(config, prompts=bench_prompts(config)))
        wall = time.perf_counter() - wall
        idle = sampler.stop() if sampling else None
    ray.shutdown()

    if args.device == "cuda":
        import torch

        machine = args.label or torch.cuda.get_device_name(0)
    else:
        machine = args.label or f"CPU ({platform.processor() or platform.machine()})"
    result = {
        "benchmark": "rl",
        "machine": machine,
        "device": args.device,
        "preset": model_name(args),
        "sync_path": f"weight group ({'nccl' if args.device == 'cuda' else 'gloo'})",
        "config": {
            "prompts": args.prompts,
            "group_size": args.group_size,
            "max_tokens": args.max_tokens,
            "zero_stage": args.zero_stage,
            "warmup": args.warmup,
            "steps": args.steps,
            "dtype": config.model.dtype,
            "bucket_mb": args.bucket_mb,
            "lr": args.lr,
        },
        "sync_check_max_logprob_error": sync_error,
        **summarize(summary.history, args.warmup),
        "gpu_idle_fraction": None if idle is None else round(idle, 4),
        "gpu_idle_source": sampler.source,
        "gpu_idle_note": None if idle is not None else "no GPU utilisation source (NVML, nvidia-smi)",
        "wall_s": round(wall, 2),
        "targets": {"sync_gbps_min": SYNC_GBPS_TARGET, "sync_share_max": SYNC_SHARE_TARGET},
    }
    result["meets_targets"] = (
        result["sync_gbps"] >= SYNC_GBPS_TARGET and result["sync_share_of_step"] <= SYNC_SHARE_TARGET
    )
    out = Path(args.out or ROOT / "benchmarks/results" / f"rl-{args.device}-{model_name(args)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
