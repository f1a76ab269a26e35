"""The policy trainer: one data-parallel rank of DeepSpeed, run as a Ray actor.

Log-probabilities come from a cache-free forward of whole packed episodes
(``cache_free_batch`` + ``model(ids, batch)``), so they are differentiable and equal what the
engine computes token by token. The frozen reference model (for the KL term) is the initial policy.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from msa.cluster.weight_transport import WeightGroup, send_buckets
from msa.cluster.weights import BucketLayout, TensorSpec
from msa.model import cache_free_batch
from msa.platform.checkpoint import keeps_fp32, load_model
from msa.rl.algorithms import policy_loss_sums
from msa.rl.batch import PackedBatch, TrainSample, pack
from msa.rl.config import AlgorithmSection, ModelSection, TrainerSection

# Per-token means in ``train_step``'s metrics; ``train/tokens`` is their weight across ranks.
TOKEN_MEAN_TERMS = ("loss", "pg", "kl", "clipped", "ratio")


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port for the rank-0 rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:
        ip = "127.0.0.1"
    return ip, port


def deepspeed_config(section: TrainerSection, *, bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,  # a micro-batch is one packed row of episodes
        "gradient_accumulation_steps": section.grad_accum_steps,
        "gradient_clipping": section.grad_clip,
        "zero_optimization": {"stage": section.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class PolicyTrainer:
    """Rank ``rank`` of ``world``. Call ``setup`` once (it joins the process group), then
    ``train_step`` per rollout batch. The weights reach the engine through the weight group
    (``open_weight_group`` once, ``broadcast_weights`` per sync) or, for a caller without one,
    as CPU tensors from ``named_weights``."""

    def __init__(
        self, rank: int, world: int, model: ModelSection, trainer: TrainerSection, algorithm: AlgorithmSection
    ) -> None:
        self.rank, self.world = rank, world
        self.model_section, self.section, self.algorithm = model, trainer, algorithm
        self.engine = None
        self.reference = None
        self._weight_group: WeightGroup | None = None
        self._weight_layout: BucketLayout | None = None

    def address(self) -> tuple[str, int]:
        return free_address()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, build the policy (and reference), wrap it in DeepSpeed.
        Returns the parameter count."""
        import deepspeed

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world),
            LOCAL_RANK="0",
        )
        cuda = self.model_section.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        model, self.model_config = load_model(
            self.model_section.source,
            dtype=torch.float32,
            device=self.device,
            seed=self.model_section.seed,
            progress=False,
        )
        model.train()
        if self.algorithm.kl_coef > 0:
            reference, _ = load_model(
                self.model_section.source,
                dtype=torch.bfloat16 if cuda else torch.float32,
                device=self.device,
                seed=self.model_section.seed,
                progress=False,
            )
            self.reference = reference.eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=self.section.lr,
            betas=self.section.betas,
            weight_decay=self.section.weight_decay,
            fused=cuda,
        )
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(self.section, bf16=cuda)
        )
        return sum(p.numel() for p in model.parameters())

    # Log-probabilities ---------------------------------------------------------------------------

    def _token_logprobs(
        self, module: torch.nn.Module, batch: PackedBatch, indexer_losses: list | None = None
    ) -> torch.Tensor:
        """log p(target) ``[N]`` fp32 for the batch's trained tokens; ``indexer_losses``, a list,
        receives each MSA layer's indexer loss."""
        attn = cache_free_batch(batch.lengths, self.model_config.sparse.block_size, device=self.device)
        attn.indexer_losses = indexer_losses
        logits = module(batch.input_ids, attn, rows=batch.pred_rows)
        return torch.log_softmax(logits.float(), dim=-1).gather(1, batch.targets[:, None])[:, 0]

    @torch.no_grad()
    def logprobs(self, samples: list[TrainSample]) -> list[list[float]]:
        """Per sample, the policy's log-probabilities of its trained tokens, in order."""
        batch = pack(samples, self.device)
        flat = self._token_logprobs(self.engine.module, batch).cpu().tolist()
        out, start = [], 0
        for s in samples:
            out.append(flat[start : start + s.num_loss_tokens])
            start += s.num_loss_tokens
        return out

    # Training ----------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[list[TrainSample]], global_tokens: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches. ``global_tokens``: trained
        tokens over every rank's micro-batches, so the loss is a token mean over the whole step."""
        if len(micro_batches) != self.section.grad_accum_steps:
            raise ValueError(
                f"expected {self.section.grad_accum_steps} micro-batches, got {len(micro_batches)}"
            )
        engine = self.engine
        engine.train()
        # DeepSpeed divides each micro-batch loss by the accumulation steps and averages ranks.
        scale = self.section.grad_accum_steps * self.world / max(global_tokens, 1)
        totals = dict.fromkeys((*TOKEN_MEAN_TERMS, "tokens"), 0.0)
        indexer_kl = []
        for samples in micro_batches:
            terms = self._micro_step(samples, scale)
            if "indexer_kl" in terms:
                indexer_kl.append(terms.pop("indexer_kl"))
            for key, value in terms.items():
                totals[key] += value
        grad_norm = engine.get_global_grad_norm()
        tokens = totals.pop("tokens")
        metrics = {f"train/{k}": v / max(tokens, 1.0) for k, v in totals.items()}
        if indexer_kl:
            # Per MSA layer, mean over index heads and queries; averaged over the micro-batches.
            metrics["train/indexer_kl"] = sum(indexer_kl) / len(indexer_kl)
        metrics["train/tokens"] = tokens
        metrics["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["train/lr"] = engine.get_lr()[0]
        return metrics

    def _micro_step(self, samples: list[TrainSample], scale: float) -> dict[str, float]:
        engine = self.engine
        batch = pack(samples, self.device)
        if batch.targets.numel() == 0:
            # Every rank must run the same number of backward passes; this one adds a zero gradient.
            loss = sum(p.sum() for p in engine.module.parameters()) * 0.0
            engine.backward(loss)
            engine.step()
            return {"tokens": 0.0}
        indexer_losses = [] if self.algorithm.indexer_kl_coef > 0 else None
        logprobs = self._token_logprobs(engine, batch, indexer_losses)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = self._token_logprobs(self.reference, batch)
        terms = policy_loss_sums(
            logprobs,
            batch.old_logprobs,
            batch.advantages,
            torch.ones_like(logprobs),
            clip_low=self.algorithm.clip_low,
            clip_high=self.algorithm.clip_high,
            kl_coef=self.algorithm.kl_coef,
            ref_logprobs=ref,
        )
        loss = terms.loss * scale
        extra = {}
        if indexer_losses:
            # A mean per layer already: DeepSpeed's averaging over micro-batches and ranks keeps it one.
            indexer = torch.stack(indexer_losses).sum()
            loss = loss + self.algorithm.indexer_kl_coef * indexer
            extra["indexer_kl"] = float(indexer.detach()) / len(indexer_losses)
        engine.backward(loss)
        engine.step()
        return extra | {
            "loss": float(terms.loss.detach()),
            "pg": float(terms.pg),
            "kl": float(terms.kl),
            "clipped": float(terms.clipped),
            "ratio": float(terms.ratio),
            "tokens": float(logprobs.numel()),
        }

    # Weights and checkpoints -------------------------------------------------------------------

    @staticmethod
    def _sync_dtype(name: str, dtype: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
        """``cast`` for floating tensors, except the fp32 router tensors, which the engine keeps."""
        if cast is not None and dtype.is_floating_point and not keeps_fp32(name):
            return cast
        return dtype

    @torch.no_grad()
    def named_weights(self, dtype: str | None = None) -> list[tuple[str, torch.Tensor]]:
        """Full (unsharded) policy weights on the CPU by state_dict name, cast to ``dtype`` if given
        (the fp32 router tensors stay fp32, as the engine keeps them). Rank 0 returns them, other
        ranks an empty list; under ZeRO-3 every rank must be called, since each parameter is
        all-gathered (one at a time, so no rank ever holds a second full copy)."""
        cast = getattr(torch, dtype) if dtype else None
        out = []
        for name, tensor in self._full_tensors():
            if self.rank == 0:
                tensor = tensor.detach().to(self._sync_dtype(name, tensor.dtype, cast))
                out.append((name, tensor.to("cpu", copy=True)))
        return out

    def _full_tensors(self, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors by state_dict name, in module order (only ``names`` when given). Under
        ZeRO-3 each parameter is gathered, by every rank, while the consumer holds it."""
        module = self.engine.module
        zero3 = self.section.zero_stage == 3
        if zero3:
            import deepspeed
        for name, param in module.named_parameters():
            if names is not None and name not in names:
                continue
            if zero3:
                with deepspeed.zero.GatheredParameters([param]):
                    yield name, param.data
            else:
                yield name, param.data
        for name, buffer in module.named_buffers():
            if names is None or name in names:
                yield name, buffer

    def weight_manifest(self, dtype: str | None = None) -> list[TensorSpec]:
        """Name, full shape and sync dtype of every tensor ``_full_tensors`` yields, in order,
        without gathering anything (a ZeRO-3 parameter knows its full shape as ``ds_shape``)."""
        cast = getattr(torch, dtype) if dtype else None
        module = self.engine.module
        specs = []
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            shape = tuple(getattr(t, "ds_shape", t.shape))
            specs.append(TensorSpec(name, shape, self._sync_dtype(name, t.dtype, cast)))
        return specs

    def open_weight_group(
        self, host: str, port: int, world: int, layout: BucketLayout, timeout_s: float
    ) -> None:
        """Rank 0 joins the weight group as its sender (rank 0, hosting the store at
        ``host:port``); every rank keeps ``layout``, since under ZeRO-3 all of them gather."""
        self.close_weight_group()
        self._weight_layout = layout
        if self.rank == 0:
            self._weight_group = WeightGroup(host, port, 0, world, self.device, timeout_s)

    @torch.no_grad()
    def broadcast_weights(self, version: int, corrupt_bucket: int | None = None) -> dict[str, float]:
        """Send the full policy weights as ``version`` through the weight group, bucket by bucket
        from this device (every rank must be called under ZeRO-3; only rank 0 sends). Returns the
        tensor bytes sent and the seconds it took. ``corrupt_bucket`` damages that bucket in
        transit, after its checksum was taken (tests)."""
        layout = self._weight_layout
        if layout is None:
            raise RuntimeError("broadcast_weights before open_weight_group")
        start = time.perf_counter()
        names = {t.name for b in layout.buckets for t in b.tensors}
        tensors = self._full_tensors(names)
        sent = 0
        if self.rank == 0:
            sent = send_buckets(self._weight_group, layout, tensors, version, corrupt_bucket=corrupt_bucket)
        for _ in tensors:  # the rest of the walk: other ranks take part in every ZeRO-3 gather
            pass
        return {"bytes": float(sent), "seconds": time.perf_counter() - start}

    def close_weight_group(self) -> None:
        if self._weight_group is not None:
            self._weight_group.close()
        self._weight_group, self._weight_layout = None, None

    def save(self, directory: str, tag: str) -> None:
        """Model, optimizer and scheduler state (DeepSpeed layout) plus this rank's RNG states."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        self.engine.save_checkpoint(directory, tag=tag, client_state={"rng": rng})

    def load(self, directory: str, tag: str) -> None:
        path, client = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
        rng = client["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def checkpoint_exists(self, directory: str, tag: str) -> bool:
        return (Path(directory) / tag).is_dir()
