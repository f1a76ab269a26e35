"""Configuration of an RL post-training run: one dataclass per part, read from a YAML file.

Every section is validated when it is built, each field's type (from its annotation) before its
range; errors name the field (``rollout.group_size``) and the allowed type or range. Unknown keys
are rejected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msa.platform.config import ConfigError, is_int, is_real


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"rl config field '{name}' must be {allowed}, got {value!r}")


# Numbers in exponent notation without a dot or without an exponent sign (``1e-5``, ``1.0e5``): YAML
# 1.1, which PyYAML follows, reads them as strings, YAML 1.2 (and OmegaConf) as floats.
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _as_annotated(value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` asks for (ints widen to floats, lists become tuples, exponent
    strings become floats, a mapping left empty in YAML, null, becomes {}); raises TypeError when it
    is not of that type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        for option in args:
            try:
                return _as_annotated(value, option)
            except TypeError:
                pass
    elif hint is type(None) and value is None:
        return value
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is int and is_int(value):
        return value
    elif hint is float and is_real(value):
        return float(value)
    elif hint is float and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    elif hint is str and isinstance(value, str):
        return value
    elif origin is dict and value is None:
        return {}
    elif origin is dict and isinstance(value, dict):
        key_type, value_type = args or (Any, Any)
        return {_as_annotated(k, key_type): _as_annotated(v, value_type) for k, v in value.items()}
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_as_annotated(v, args[0]) for v in value)
        if len(value) == len(args):
            return tuple(_as_annotated(v, t) for v, t in zip(value, args, strict=True))
    elif origin is list and isinstance(value, (list, tuple)):
        return [_as_annotated(v, args[0] if args else Any) for v in value]
    raise TypeError(f"{value!r} is not a {hint}")


def _check_types(section: Any, prefix: str) -> None:
    """Check every field of a section against its annotation, before the range checks compare it."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        try:
            setattr(section, f.name, _as_annotated(value, hints[f.name]))
        except TypeError:
            raise ConfigError(
                f"rl config field '{prefix}.{f.name}' must be of type {f.type}, "
                f"got {value!r} ({type(value).__name__})"
            ) from None


def _check_env_options(name: str, options: dict[str, Any]) -> None:
    """The options must be arguments of the environment's constructor, which gets them per episode."""
    from msa.rl.envs import ENVIRONMENTS

    signature = inspect.signature(ENVIRONMENTS[name])
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in signature.parameters.values() if p.kind in kinds]
    if all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        for key in options:
            if key not in accepted:
                raise ConfigError(
                    f"rl config field 'env.options.{key}' is not an option of environment '{name}'; "
                    f"accepted options: {accepted}"
                )
    try:
        signature.bind(**options)
    except TypeError as e:
        raise ConfigError(f"rl config field 'env.options' does not fit environment '{name}': {e}") from None


def _int_at_least(obj: Any, section: str, low: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(
            is_int(value) and value >= low,
            f"{section}.{name}",
            f"an integer >= {low}",
            value,
        )


@dataclass(kw_only=True, slots=True)
class ModelSection:
    """The policy: a preset name or checkpoint directory, the seed of a preset's random weights."""

    source: str = "tiny"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_types(self, "model")
        _require(
            isinstance(self.source, str) and bool(self.source),
            "model.source",
            "a preset name or a checkpoint directory",
            self.source,
        )
        _require(self.device in ("cpu", "cuda"), "model.device", "'cpu' or 'cuda'", self.device)

    @property
    def dtype(self) -> str:
        """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and the tiny runs want exact math)."""
        return "bfloat16" if self.device == "cuda" else "float32"


@dataclass(kw_only=True, slots=True)
class EngineSection:
    """The rollout engine (``msa.cluster.engine.MSAEngine``): its split and KV budget, and the
    size of one bucket of the trainers' weight broadcast."""

    tp: int = 1
    sp: int = 1
    num_pages: int | None = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    gpu_memory_utilization: float = 0.5
    weight_bucket_bytes: int = 512 << 20

    def __post_init__(self) -> None:
        _check_types(self, "engine")
        _int_at_least(
            self, "engine", 1, "tp", "sp", "max_num_seqs", "max_num_batched_tokens", "weight_bucket_bytes"
        )
        _require(
            self.num_pages is None or (isinstance(self.num_pages, int) and self.num_pages >= 1),
            "engine.num_pages",
            "None or an integer >= 1",
            self.num_pages,
        )
        _require(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "engine.gpu_memory_utilization",
            "in (0, 1]",
            self.gpu_memory_utilization,
        )


@dataclass(kw_only=True, slots=True)
class DataSection:
    """Prompts from a local jsonl or parquet file. ``fields`` maps the sample keys the environment
    reads (e.g. ``prompt``, ``answer``) to the dataset's column names."""

    path: str = ""
    format: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    shuffle: bool = True

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _require(
            isinstance(self.path, str) and bool(self.path), "data.path", "a jsonl or parquet file", self.path
        )
        _require(
            self.format in (None, "json", "parquet"),
            "data.format",
            "'json', 'parquet' or null (from the file suffix)",
            self.format,
        )
        _require(
            isinstance(self.fields, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.fields.items()),
            "data.fields",
            "a mapping of sample key -> column name",
            self.fields,
        )

    @property
    def loader(self) -> str:
        if self.format is not None:
            return self.format
        return "parquet" if self.path.endswith(".parquet") else "json"


@dataclass(kw_only=True, slots=True)
class EnvSection:
    """Which environment scores the episodes, and its options (passed to its constructor)."""

    name: str = "repeat_char"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from msa.rl.envs import ENVIRONMENTS

        _check_types(self, "env")
        _require(self.name in ENVIRONMENTS, "env.name", f"one of {sorted(ENVIRONMENTS)}", self.name)
        _check_env_options(self.name, self.options)


@dataclass(kw_only=True, slots=True)
class RolloutSection:
    """Group sampling: ``prompts_per_step`` prompts, ``group_size`` episodes each.

    overlap: generate the next step's rollouts while the trainer updates (one step off-policy);
    the engine switches weights only after those rollouts finish, so none mixes versions.
    """

    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 16
    max_turns: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_concurrency: int = 64
    max_retries: int = 2
    max_regenerations: int = 3
    episode_timeout_s: float = 120.0
    overlap: bool = False

    def __post_init__(self) -> None:
        _check_types(self, "rollout")
        _int_at_least(self, "rollout", 1, "prompts_per_step", "max_tokens", "max_turns", "max_concurrency")
        _int_at_least(self, "rollout", 2, "group_size")
        _int_at_least(self, "rollout", 0, "max_retries", "max_regenerations")
        _require(0.0 < self.temperature <= 2.0, "rollout.temperature", "in (0, 2]", self.temperature)
        _require(0.0 < self.top_p <= 1.0, "rollout.top_p", "in (0, 1]", self.top_p)
        _require(
            self.episode_timeout_s > 0, "rollout.episode_timeout_s", "> 0 seconds", self.episode_timeout_s
        )


@dataclass(kw_only=True, slots=True)
class AlgorithmSection:
    """The policy-gradient estimator and its loss.

    name: "grpo" (group-normalised advantages) or "reinforce_pp" (REINFORCE++: batch-normalised).
    clip_low/clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    kl_coef: weight of the k3 KL estimate to the frozen initial policy (0 turns the reference off).
    indexer_kl_coef: weight of the MSA indexer's sparse-KL loss (``msa.model.indexer_loss``). It
    reaches only the index projections and norms, and keeps the indexer picking the blocks the
    changing policy's attention uses; 0 leaves the indexer as loaded.
    """

    name: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    indexer_kl_coef: float = 0.0
    normalize_std: bool = True
    updates_per_rollout: int = 1

    def __post_init__(self) -> None:
        _check_types(self, "algorithm")
        _require(
            self.name in ("grpo", "reinforce_pp"), "algorithm.name", "'grpo' or 'reinforce_pp'", self.name
        )
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            _require(
                0.0 < value < 1.0 or (name == "clip_high" and 0.0 < value <= 10.0),
                f"algorithm.{name}",
                "in (0, 1)" if name == "clip_low" else "in (0, 10]",
                value,
            )
        _require(self.kl_coef >= 0.0, "algorithm.kl_coef", ">= 0", self.kl_coef)
        _require(self.indexer_kl_coef >= 0.0, "algorithm.indexer_kl_coef", ">= 0", self.indexer_kl_coef)
        _int_at_least(self, "algorithm", 1, "updates_per_rollout")


@dataclass(kw_only=True, slots=True)
class TrainerSection:
    """DeepSpeed trainers placed by Ray: ``num_trainers`` data-parallel ranks, each splitting its
    share of the batch into ``grad_accum_steps`` micro-batches."""

    num_trainers: int = 1
    cpus_per_trainer: float = 1.0
    gpus_per_trainer: float = 0.0
    zero_stage: int = 1
    grad_accum_steps: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _check_types(self, "trainer")
        _int_at_least(self, "trainer", 1, "num_trainers", "grad_accum_steps")
        _require(self.zero_stage in (0, 1, 2, 3), "trainer.zero_stage", "0, 1, 2 or 3", self.zero_stage)
        _require(self.cpus_per_trainer > 0, "trainer.cpus_per_trainer", "> 0", self.cpus_per_trainer)
        _require(self.gpus_per_trainer >= 0, "trainer.gpus_per_trainer", ">= 0", self.gpus_per_trainer)
        _require(0.0 < self.lr < 1.0, "trainer.lr", "in (0, 1)", self.lr)
        _require(self.weight_decay >= 0.0, "trainer.weight_decay", ">= 0", self.weight_decay)
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "trainer.betas",
            "two numbers in [0, 1)",
            self.betas,
        )
        _require(self.grad_clip > 0, "trainer.grad_clip", "> 0", self.grad_clip)


@dataclass(kw_only=True, slots=True)
class RunSection:
    """Length, seed, where outputs go, and how often a resumable checkpoint is written."""

    steps: int = 10
    seed: int = 0
    output_dir: str = "runs/rl"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True

    def __post_init__(self) -> None:
        _check_types(self, "run")
        _int_at_least(self, "run", 1, "steps", "keep_checkpoints")
        _int_at_least(self, "run", 0, "checkpoint_every", "seed")
        _require(
            isinstance(self.output_dir, str) and bool(self.output_dir),
            "run.output_dir",
            "a directory",
            self.output_dir,
        )


@dataclass(kw_only=True, slots=True)
class LoggingSection:
    """wandb (offline unless set otherwise), metrics.jsonl and a reward/loss PNG in the output dir."""

    wandb_mode: str = "offline"
    wandb_project: str = "msa-rl"
    run_name: str | None = None
    plot_every: int = 10
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _check_types(self, "logging")
        _require(
            self.wandb_mode in ("online", "offline", "disabled"),
            "logging.wandb_mode",
            "'online', 'offline' or 'disabled'",
            self.wandb_mode,
        )
        _int_at_least(self, "logging", 1, "plot_every")


_SECTIONS = {
    "model": ModelSection,
    "engine": EngineSection,
    "data": DataSection,
    "env": EnvSection,
    "rollout": RolloutSection,
    "algorithm": AlgorithmSection,
    "trainer": TrainerSection,
    "run": RunSection,
    "logging": LoggingSection,
}


@dataclass(kw_only=True, slots=True)
class RLConfig:
    """A whole run. ``RLConfig.from_dict`` / ``load_rl_config`` build it from nested mappings."""

    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineSection = field(default_factory=EngineSection)
    data: DataSection
    env: EnvSection = field(default_factory=EnvSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    run: RunSection = field(default_factory=RunSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        total = self.rollout.prompts_per_step * self.rollout.group_size
        per_micro = self.trainer.num_trainers * self.trainer.grad_accum_steps
        _require(
            total % per_micro == 0,
            "trainer.grad_accum_steps",
            f"such that num_trainers x grad_accum_steps ({per_micro}) divides the episodes per step "
            f"(rollout.prompts_per_step x rollout.group_size = {total})",
            self.trainer.grad_accum_steps,
        )
        _require(
            self.model.device == "cuda" or self.engine.num_pages is not None,
            "engine.num_pages",
            "set when model.device is 'cpu'",
            self.engine.num_pages,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RLConfig:
        unknown = set(raw) - set(_SECTIONS)
        if unknown:
            raise ConfigError(f"unknown rl config section(s) {sorted(unknown)}; allowed: {sorted(_SECTIONS)}")
        kwargs = {}
        for name, section in _SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"rl config section '{name}' must be a mapping, got {values!r}")
            allowed = {f.name for f in dataclasses.fields(section)}
            extra = set(values) - allowed
            if extra:
                raise ConfigError(
                    f"unknown field(s) {sorted(extra)} in rl config section '{name}'; "
                    f"allowed: {sorted(allowed)}"
                )
            if name == "data" and not values:
                raise ConfigError("rl config field 'data.path' is required")
            kwargs[name] = section(**values)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_rl_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RLConfig:
    """Read a YAML run config; ``overrides`` maps dotted keys (``run.steps``, ``env.options.length``)
    to values. A section or mapping left empty in the file (``logging:``) counts as ``{}``."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    for dotted, value in (overrides or {}).items():
        *parents, key = dotted.split(".")
        if not parents or not all(parents) or not key:
            raise ConfigError(f"override {dotted!r} must look like section.field")
        node = raw
        for depth, part in enumerate(parents, 1):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parents[:depth])
                raise ConfigError(f"override {dotted!r}: rl config '{where}' is {node!r}, not a mapping")
        node[key] = value
    return RLConfig.from_dict(raw)
