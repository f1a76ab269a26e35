"""The run config's checks: field types before ranges, YAML quirks, overrides and env options."""

from __future__ import annotations

import re
from typing import Any

import pytest

from msa.platform.config import ConfigError
from msa.rl.cli import _overrides
from msa.rl.config import RLConfig, RolloutSection, load_rl_config


def with_field(section: str, name: str, value: Any) -> dict[str, Any]:
    return {"data": {"path": "x.jsonl"}, section: {name: value}}


@pytest.mark.parametrize(
    "section,name,value",
    [
        ("trainer", "lr", "fast"),
        ("rollout", "temperature", "hot"),
        ("algorithm", "kl_coef", None),
        ("trainer", "betas", 0.9),
        ("trainer", "betas", [0.9, 0.99, 0.999]),
        ("trainer", "zero_stage", True),
        ("data", "shuffle", "no"),
        ("model", "seed", "x"),
        ("rollout", "episode_timeout_s", "60"),
        ("algorithm", "normalize_std", "yes please"),
        ("engine", "num_pages", 1.5),
        ("logging", "run_name", 3),
        ("data", "fields", {"prompt": 1}),
        ("env", "options", [4]),
    ],
)
def test_a_wrongly_typed_field_is_a_config_error_naming_it(section, name, value):
    with pytest.raises(
        ConfigError, match=rf"'{section}\.{name}' must be of type .*got {re.escape(repr(value))}"
    ):
        RLConfig.from_dict(with_field(section, name, value))


def test_sections_built_directly_check_types_too():
    with pytest.raises(ConfigError, match="rollout.max_tokens"):
        RolloutSection(max_tokens="16")


def test_floats_in_exponent_notation_load_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  path: x.jsonl\ntrainer:\n  lr: 1e-5\nalgorithm:\n  kl_coef: 1e-3\n")
    config = load_rl_config(path)
    assert config.trainer.lr == 1e-05 and isinstance(config.trainer.lr, float)
    assert config.algorithm.kl_coef == 1e-3
    config = load_rl_config(path, _overrides(["trainer.lr=3e-6", "rollout.temperature=7E-1"]))
    assert config.trainer.lr == 3e-6 and config.rollout.temperature == 0.7


def test_ints_widen_to_floats_and_lists_to_tuples():
    config = RLConfig.from_dict(
        {"data": {"path": "x.jsonl"}, "trainer": {"cpus_per_trainer": 2, "betas": [0.9, 0.95]}}
    )
    assert config.trainer.cpus_per_trainer == 2.0 and isinstance(config.trainer.cpus_per_trainer, float)
    assert config.trainer.betas == (0.9, 0.95)


def test_an_override_on_an_empty_section_or_nested_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  path: x.jsonl\nlogging:\nenv:\n  name: repeat_char\n  options:\n")
    config = load_rl_config(path, {"logging.run_name": "bob", "env.options.length": 3})
    assert config.logging.run_name == "bob" and config.env.options == {"length": 3}
    config = load_rl_config(path)
    assert config.logging.run_name is None and config.env.options == {}
    with pytest.raises(ConfigError, match="'env.name' is 'repeat_char', not a mapping"):
        load_rl_config(path, {"env.name.x": 1})


def test_env_options_are_checked_against_the_environment():
    with pytest.raises(ConfigError, match=r"'env\.options\.lenght'.*accepted options: \['length'\]"):
        RLConfig.from_dict(
            {"data": {"path": "x.jsonl"}, "env": {"name": "repeat_char", "options": {"lenght": 4}}}
        )
    with pytest.raises(ConfigError, match=r"'env\.options\.length'.*'coding'.*\['timeout_s', 'memory_mb'\]"):
        RLConfig.from_dict({"data": {"path": "x.jsonl"}, "env": {"name": "coding", "options": {"length": 4}}})
    env = RLConfig.from_dict(
        {"data": {"path": "x.jsonl"}, "env": {"name": "coding", "options": {"timeout_s": 2}}}
    ).env
    assert env.options == {"timeout_s": 2}


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_rl_config(path)
