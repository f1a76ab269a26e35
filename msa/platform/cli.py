"""The ``msa`` command line. One small parser per subcommand, registered in ``SUBCOMMANDS``.

A subcommand is a function that adds its parser to the ``msa`` subparsers and sets ``run`` (a
function of the parsed args returning an exit code) as a default. Heavy libraries (torch, Ray)
are imported inside ``run``, so ``msa --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from msa.platform.config import PRESETS, ConfigError

DTYPES = ("float32", "bfloat16")


def check_device(device: str | None) -> None:
    """ConfigError for ``--device cuda`` where no GPU is."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")


def _device_and_dtype(args: argparse.Namespace):
    """(device, torch dtype): defaults are the GPU in bf16 when there is one, else the CPU in fp32."""
    import torch

    check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    return device, getattr(torch, dtype)


def _float_in(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a number in [low, high], or (low, high] with ``open_low``."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        value = float(text)
        if not ((low < value if open_low else low <= value) and value <= high):
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    parse.__name__ = "float"  # argparse names the type in its "invalid float value" message
    return parse


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weight dtype (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="torch device (default: cuda if available, else cpu)",
    )


# msa generate ------------------------------------------------------------------------------------


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Load a model (checkpoint directory or preset with random weights) "
        "and stream a sampled continuation of the prompt.",
    )
    p.add_argument("--prompt", required=True, help="text to continue (a bos token is put before it)")
    p.add_argument(
        "--model", default="tiny", help=f"checkpoint directory or preset {sorted(PRESETS)} (default: tiny)"
    )
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    # The ranges of msa.cluster.protocol.SamplingParams (the HTTP API's).
    p.add_argument(
        "--temperature", type=_float_in(0.0, 2.0), default=0.8, help="in [0, 2]; 0 is greedy (default: 0.8)"
    )
    p.add_argument(
        "--top-p",
        type=_float_in(0.0, 1.0, open_low=True),
        default=1.0,
        help="nucleus sampling mass in (0, 1] (default: 1.0, off)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling and a preset's random weights")
    _add_model_options(p)
    p.set_defaults(run=_run_generate)


def _load_tokenizer(model: str):
    from msa.platform.tokenizer import Tokenizer

    return Tokenizer.from_directory(model) if Path(model).is_dir() else Tokenizer.byte_level_default()


def _run_generate(args: argparse.Namespace) -> int:
    from msa.model.generate import generate_stream
    from msa.platform.checkpoint import load_model

    device, dtype = _device_and_dtype(args)
    model, config = load_model(args.model, dtype=dtype, device=device, seed=args.seed)
    tokenizer = _load_tokenizer(args.model)
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
    if not prompt_ids or max(prompt_ids) >= config.vocab_size:
        raise ValueError(f"the prompt encodes to ids outside the model's vocabulary of {config.vocab_size}")
    stop_ids = list(dict.fromkeys([*tokenizer.eos_token_ids, *config.eos_token_ids]))
    stream = tokenizer.stream_decoder()
    tokens = generate_stream(
        model,
        prompt_ids,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stop_ids,
    )
    for token in tokens:
        sys.stdout.write(stream.feed(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    return 0


# msa save-preset ---------------------------------------------------------------------------------


def _add_save_preset(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "save-preset",
        help="write a preset with random weights as a checkpoint",
        description="Write config.json, safetensors weights (seeded random init) "
        "and the byte-level default tokenizer, for tests and benchmarks.",
    )
    p.add_argument("name", choices=sorted(PRESETS), help="preset to build")
    p.add_argument("directory", type=Path, help="where to write the checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument(
        "--layout",
        choices=("flat", "vl"),
        default="flat",
        help="tensor names and config.json of the text-only (flat) or vision-language release",
    )
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default: bfloat16)")
    p.add_argument(
        "--max-shard-bytes", type=int, default=5 * 2**30, help="largest safetensors file (default: 5 GiB)"
    )
    p.set_defaults(run=_run_save_preset)


def _run_save_preset(args: argparse.Namespace) -> int:
    import torch

    from msa.platform.checkpoint import load_model, save_checkpoint
    from msa.platform.tokenizer import Tokenizer

    model, config = load_model(args.name, dtype=getattr(torch, args.dtype), device="cpu", seed=args.seed)
    save_checkpoint(model, args.directory, config, max_shard_bytes=args.max_shard_bytes, layout=args.layout)
    Tokenizer.byte_level_default().save(args.directory)
    print(args.directory)
    return 0


# Entry point -------------------------------------------------------------------------------------

SubcommandBuilder = Callable[[argparse._SubParsersAction], None]
SUBCOMMANDS: dict[str, SubcommandBuilder] = {
    "generate": _add_generate,
    "save-preset": _add_save_preset,
}
# Subcommands of the parts built on top of the platform (serve, train, submit). They are named, not
# imported, here so the platform never depends on them; each module exposes ``register(subparsers)``.
LAYER_COMMANDS = ("msa.serve.cli", "msa.rl.cli")


def build_parser() -> argparse.ArgumentParser:
    """The ``msa`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="msa", description="Serve and post-train MiniMax-M3 (MSA) models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(subparsers)
    for module in LAYER_COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def run_subcommand(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; its exit code, or 1 and a one-line message for a known error: a
    bad config or flag, a missing file, a cluster that cannot be reached."""
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, ValueError, ConnectionError) as exc:
        print(f"msa {args.command}: error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run one ``msa`` subcommand; returns its exit code."""
    return run_subcommand(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
