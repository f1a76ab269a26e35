"""Checkpoint pruning and the fresh-run guard, the dataset field mapping, and the merge of the
trainers' per-rank metrics; none of them starts the engine or a trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray
import yaml

from msa.platform.config import ConfigError
from msa.rl.checkpoint import checkpoint_root, latest_checkpoint, mark_latest, step_dir
from msa.rl.cli import main
from msa.rl.config import DataSection
from msa.rl.data import load_prompts
from msa.rl.train import trainer_metrics
from tests.rl.conftest import tiny_run_config


def finished(output_dir: Path, *steps: int) -> None:
    """Checkpoint folders as far as pruning looks: a ``driver.pt`` marks one finished."""
    for step in steps:
        directory = step_dir(output_dir, step)
        directory.mkdir(parents=True)
        (directory / "driver.pt").write_bytes(b"")


def kept(output_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_root(output_dir).glob("step_*"))


def test_pruning_keeps_the_newest_older_checkpoints_and_the_marked_one(tmp_path):
    finished(tmp_path, 1, 2, 3, 4)
    step_dir(tmp_path, 5).mkdir()  # being written: no driver state yet
    mark_latest(tmp_path, step_dir(tmp_path, 4), keep=2)
    assert kept(tmp_path) == ["step_000003", "step_000004", "step_000005"]
    mark_latest(tmp_path, step_dir(tmp_path, 4), keep=1)
    assert kept(tmp_path) == ["step_000004", "step_000005"]
    assert (checkpoint_root(tmp_path) / "latest").read_text().strip() == "step_000004"


def test_pruning_never_deletes_the_marked_checkpoint_or_later_steps(tmp_path):
    finished(tmp_path, 2, 4, 1)  # steps 2 and 4 from an earlier run, 1 just written
    mark_latest(tmp_path, step_dir(tmp_path, 1), keep=2)
    assert kept(tmp_path) == ["step_000001", "step_000002", "step_000004"]
    assert (checkpoint_root(tmp_path) / "latest").read_text().strip() == "step_000001"


def test_a_latest_pointer_to_a_missing_checkpoint_names_it(tmp_path):
    checkpoint_root(tmp_path).mkdir(parents=True)
    (checkpoint_root(tmp_path) / "latest").write_text("step_000007\n")
    with pytest.raises(FileNotFoundError, match="step_000007"):
        latest_checkpoint(tmp_path)


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints_before_starting(tmp_path, capsys):
    out = tmp_path / "run"
    finished(out, 2, 4)
    config = tiny_run_config(str(out), run={"resume": False, "checkpoint_every": 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert "run.resume=true" in err and "run.output_dir" in err and str(out) in err
    assert "latest step 4" in err
    assert not ray.is_initialized()
    assert kept(out) == ["step_000002", "step_000004"]


def test_a_resume_with_run_steps_below_its_checkpoint_is_refused_before_starting(tmp_path, capsys):
    out = tmp_path / "run"
    finished(out, 4, 8)
    mark_latest(out, step_dir(out, 8), keep=2)
    config = tiny_run_config(str(out), run={"resume": True, "steps": 5})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"run.steps is 5, but the checkpoint to resume in {out} is at step 8" in err
    assert not ray.is_initialized()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_mapped_column_wins_over_a_column_of_the_same_name(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "2+2?", "prompt": "raw", "target": "a"}])
    assert load_prompts(DataSection(path=path, fields={"prompt": "question"})) == [
        {"prompt": "2+2?", "target": "a"}
    ]
    both = load_prompts(DataSection(path=path, fields={"prompt": "question", "question": "question"}))
    assert both == [{"prompt": "2+2?", "question": "2+2?", "target": "a"}]
    swapped = load_prompts(DataSection(path=path, fields={"prompt": "question", "question": "prompt"}))
    assert swapped == [{"prompt": "2+2?", "question": "raw", "target": "a"}]


def test_a_mapping_to_a_missing_column_is_a_config_error_naming_data_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "2+2?"}])
    with pytest.raises(ConfigError, match=r"data\.fields names column\(s\) \['nope'\]") as caught:
        load_prompts(DataSection(path=path, fields={"prompt": "nope"}))
    assert str(caught.value).startswith("data.fields")  # not quoted like a plain KeyError


def test_trainer_metrics_are_global_token_means_over_the_ranks():
    ranks = [
        {"train/loss": 0.5, "train/pg": 0.4, "train/kl": 0.1, "train/clipped": 0.2, "train/ratio": 1.0,
         "train/tokens": 10.0, "train/grad_norm": 3.0, "train/lr": 0.01, "train/indexer_kl": 0.6},
        {"train/loss": -0.1, "train/pg": -0.2, "train/kl": 0.3, "train/clipped": 0.0, "train/ratio": 0.9,
         "train/tokens": 30.0, "train/grad_norm": 3.0, "train/lr": 0.01},
        {"train/loss": 0.0, "train/pg": 0.0, "train/kl": 0.0, "train/clipped": 0.0, "train/ratio": 0.0,
         "train/tokens": 0.0, "train/grad_norm": 3.0, "train/lr": 0.01},
    ]  # fmt: skip
    merged = trainer_metrics(ranks)
    want = {
        "train/tokens": 40.0,
        "train/loss": (10 * 0.5 + 30 * -0.1) / 40,  # 0.05
        "train/pg": (10 * 0.4 + 30 * -0.2) / 40,  # -0.05
        "train/kl": (10 * 0.1 + 30 * 0.3) / 40,  # 0.25
        "train/clipped": (10 * 0.2) / 40,  # 0.05
        "train/ratio": (10 * 1.0 + 30 * 0.9) / 40,  # 0.925
        "train/grad_norm": 3.0,
        "train/lr": 0.01,
        "train/indexer_kl": 0.6,  # only the rank that reported it
    }
    assert merged.keys() == want.keys()
    for key, value in want.items():
        assert math.isclose(merged[key], value, abs_tol=1e-12), (key, merged[key], value)
    empty = trainer_metrics([{"train/loss": 0.0, "train/tokens": 0.0}] * 2)
    assert empty == {"train/tokens": 0.0, "train/loss": 0.0}
