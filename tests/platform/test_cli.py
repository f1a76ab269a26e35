"""The ``msa`` command line: generate from a preset and from a saved checkpoint, save-preset, errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msa.platform.cli import SUBCOMMANDS, build_parser, main
from msa.platform.config import tiny

REPO = Path(__file__).resolve().parents[2]
needs_generate = pytest.mark.skipif(importlib.util.find_spec("msa.model.generate") is None,
                                    reason="msa.model.generate (generate_stream) is not written yet")


@needs_generate
def test_generate_subprocess_exits_zero_and_prints():
    result = subprocess.run([sys.executable, "-m", "msa.platform.cli", "generate", "--prompt", "hi",
                             "--max-tokens", "5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")


@needs_generate
def test_streamed_text_equals_decoding_all_tokens(capsys):
    from msa.model.generate import generate_stream
    from msa.platform.checkpoint import load_model
    from msa.platform.tokenizer import Tokenizer

    args = ["--prompt", "héllo", "--max-tokens", "12", "--temperature", "1.0", "--seed", "7",
            "--device", "cpu"]
    assert main(["generate", *args, "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    model, config = load_model("tiny", dtype=torch.float32, seed=7)
    tokenizer = Tokenizer.byte_level_default()
    prompt = tokenizer.encode("héllo", add_special_tokens=True)
    tokens = list(generate_stream(model, prompt, max_tokens=12, temperature=1.0, top_p=1.0, seed=7,
                                  stop_token_ids=tokenizer.eos_token_ids))
    assert printed == tokenizer.decode(tokens) + "\n"


@needs_generate
@pytest.mark.parametrize("layout", ["flat", "vl"])
def test_save_preset_then_generate_from_directory(tmp_path, capsys, layout):
    directory = tmp_path / "tiny"
    assert main(["save-preset", "tiny", str(directory), "--seed", "1", "--layout", layout]) == 0
    assert capsys.readouterr().out.strip() == str(directory)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).exists(), name
    common = ["generate", "--prompt", "hi", "--max-tokens", "4", "--temperature", "0", "--device", "cpu",
              "--dtype", "bfloat16"]
    assert main([*common, "--model", str(directory)]) == 0
    from_directory = capsys.readouterr().out
    assert main([*common, "--model", "tiny", "--seed", "1"]) == 0
    assert capsys.readouterr().out == from_directory  # same weights, same tokenizer, greedy


def test_save_preset_writes_a_loadable_checkpoint(tmp_path):
    from msa.platform.checkpoint import load_model

    argv = ["save-preset", "tiny", str(tmp_path), "--dtype", "float32", "--max-shard-bytes", "200000"]
    assert main(argv) == 0
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded, config = load_model(tmp_path, dtype=torch.float32, progress=False)
    fresh, _ = load_model("tiny", dtype=torch.float32, seed=0)
    assert config == tiny()
    expected = fresh.state_dict()
    assert all(torch.equal(t, expected[name]) for name, t in loaded.state_dict().items())


def test_unknown_model_is_a_one_line_error(capsys, tmp_path):
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "neither a checkpoint directory nor a preset" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, allowed", [("--top-p", "0", "(0, 1]"), ("--top-p", "2", "(0, 1]"),
                                                  ("--temperature", "-1", "[0, 2]"),
                                                  ("--temperature", "2.5", "[0, 2]")])
def test_sampling_flags_out_of_range_are_an_argparse_error(capsys, flag, value, allowed):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "hi", flag, value])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line == f"msa generate: error: argument {flag}: must be a number in {allowed}, got {value}"


def test_sampling_flags_accept_their_range_ends():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--temperature", "2", "--top-p", "1e-3"])
    assert (args.temperature, args.top_p) == (2.0, 1e-3)
    assert build_parser().parse_args(["generate", "--prompt", "x", "--temperature", "0"]).temperature == 0.0


def test_device_is_cpu_or_cuda_and_cuda_needs_a_gpu(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["generate", "--prompt", "x", "--device", "tpu"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--prompt", "hi", "--device", "cuda"]) == 1
    assert capsys.readouterr().err == "msa generate: error: --device cuda: no CUDA device is available here\n"


def test_parser_has_the_registered_subcommands():
    assert {"generate", "save-preset"} <= set(SUBCOMMANDS)
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert (args.model, args.max_tokens, args.temperature, args.top_p, args.seed) == ("tiny", 32, 0.8, 1.0, 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["save-preset", "huge", "dir"])


CONSOLE_SCRIPT = Path(sys.executable).parent / "msa"


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="the msa console script is not installed")
def test_console_script_help():
    result = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("generate", "save-preset", "serve", "train", "submit"):
        assert command in result.stdout


def test_layer_commands_parse():
    args = build_parser().parse_args(["serve", "--model", "tiny", "--tp", "2", "--port", "9001"])
    assert (args.command, args.model, args.tp, args.port) == ("serve", "tiny", 2, 9001)
    assert build_parser().parse_args(["train", "examples/rl_tiny.yaml"]).command == "train"


@pytest.mark.parametrize("field, value", [("num_mtp_modules", 1.5), ("num_mtp_modules", "1"),
                                          ("shared_intermediate_size", None)])
def test_a_bad_config_field_is_a_one_line_error(tmp_path, capsys, field, value):
    assert main(["save-preset", "tiny", str(tmp_path), "--dtype", "float32"]) == 0
    raw = json.loads((tmp_path / "config.json").read_text())
    raw[field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    message = f"config field '{field}' must be a non-negative integer, got {value!r}"
    assert err == f"msa generate: error: {message}\n"
