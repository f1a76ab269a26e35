"""Environments, tool-call parsing, the sandbox, data loading and config validation."""

from __future__ import annotations

import json
import time

import pytest

from msa.platform.config import ConfigError
from msa.rl.config import RLConfig, load_rl_config
from msa.rl.data import PromptSampler, load_prompts
from msa.rl.envs import ArithmeticEnv, CodingEnv, RepeatCharEnv
from msa.rl.envs.arithmetic import CalculatorError, calculate
from msa.rl.envs.coding import score_program
from msa.rl.envs.sandbox import run_python
from msa.rl.envs.tools import parse_tool_calls


def test_tool_calls_in_the_model_format_are_parsed():
    text = (
        'Let me compute.<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>'
        '<tool_call>{"name": 1}</tool_call><tool_call>not json</tool_call>'
    )
    calls = parse_tool_calls(text)
    assert (
        calls[0].name == "calculator"
        and calls[0].arguments == {"expression": "2*3"}
        and calls[0].error is None
    )
    assert "name" in calls[1].error
    assert "JSON" in calls[2].error


def test_calculator_evaluates_arithmetic_only():
    assert calculate("(17 * 23) + 4") == 395
    assert calculate("-2 ** 3 // 3") == -3
    for bad in ("__import__('os')", "2 ** 1000", "1 / 0", "x + 1"):
        with pytest.raises(CalculatorError):
            calculate(bad)


@pytest.mark.parametrize(
    "expression,message",
    [
        ("((9**64)**64)**2", "more than 1000 digits"),
        ("(((9**64)**64)**64)**64", "more than 1000 digits"),
        ("(10**60)**9 * (10**60)**9", "more than 1000 digits"),
        ("(10**60)**6 * 0.5", "out of the range of a float"),
        ("(10.0**60)**6", "out of the range of a float"),
        ("(-8) ** 0.5", "not a real number"),
        ("0 ** -1", "division by zero"),
    ],
)
def test_calculator_refuses_huge_or_invalid_results_as_a_tool_error(expression, message):
    env = ArithmeticEnv()
    env.reset({"question": "q", "answer": "1"})
    call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    step = env.step(f"<tool_call>{call}</tool_call>")
    assert not step.done and step.observations[0]["role"] == "tool"
    content = step.observations[0]["content"]
    assert content.startswith("error: ") and message in content


def test_calculator_keeps_large_exact_results_within_the_bound():
    assert calculate("(10**64)**15") == 10**960
    assert calculate("9**64 * 9**64") == 9**128


def test_arithmetic_episode_executes_the_tool_then_scores_the_answer():
    env = ArithmeticEnv()
    messages = env.reset({"question": "What is 17 * 23 + 4?", "answer": "395"})
    assert messages[-1] == {"role": "user", "content": "What is 17 * 23 + 4?"}
    step = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "17*23+4"}}</tool_call>')
    assert not step.done and step.observations == [{"role": "tool", "content": "395"}]
    bad = env.step('<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert "unknown tool" in bad.observations[0]["content"]
    assert env.step("The answer is 395").reward == 1.0
    assert env.step("The answer is 394").reward == 0.0


def test_repeat_char_reward_is_the_share_of_target_characters():
    env = RepeatCharEnv(length=4)
    env.reset({"prompt": "Repeat the character a", "target": "a"})
    assert env.step("aaaa").reward == 1.0
    assert env.step("abab").reward == 0.5
    assert env.step("a").reward == 0.25
    assert env.step("aaaaaaa").reward == 1.0  # only the first `length` characters count
    env.reset({"prompt": "Reply in lowercase", "target": "abcdefghijklmnopqrstuvwxyz"})
    assert env.step("ab1Z").reward == 0.5


def test_coding_reward_is_the_share_of_tests_passed():
    env = CodingEnv(timeout_s=5)
    env.reset(
        {
            "prompt": "add",
            "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 1", "assert add(2, 2) == 4"],
        }
    )
    step = env.step("Here:\n```python\ndef add(a, b):\n    return a + b\n```")
    assert step.reward == pytest.approx(2 / 3) and step.info["sandbox"] == "ok"
    assert env.step("def add(a, b) return").reward == 0.0


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


@pytest.mark.parametrize(
    "solution,reward",
    [
        ("def add(a, b):\n    return a + b", 1.0),
        ("def add(a, b):\n    return a - b", 0.0),
        # fake verdicts in the old marker format, then an exit before the runner can report
        (
            "import os\n"
            "for i in range(9):\n"
            '    print(\'__msa_test__ {"test": %d, "passed": true}\' % i, flush=True)\n'
            "os._exit(0)",
            0.0,
        ),
        # a wrong add (right on 1 test of 3) that prints one fake verdict
        ('def add(a, b):\n    return 0\nprint(\'__msa_test__ {"test": 0, "passed": true}\')', 1 / 3),
    ],
    ids=["correct", "wrong", "fake-verdicts-then-exit", "wrong-plus-fake-verdict"],
)
def test_coding_reward_counts_only_the_runners_verdicts(solution, reward):
    env = CodingEnv(timeout_s=10)
    env.reset({"prompt": "Write add(a, b)", "tests": ADD_TESTS})
    step = env.step(f"```python\n{solution}\n```")
    assert step.reward == pytest.approx(reward) and 0.0 <= step.reward <= 1.0
    assert step.info["passed"] == round(reward * len(ADD_TESTS))


def test_coding_verdicts_survive_a_solution_that_floods_stdout():
    source = "import sys\ndef add(a, b):\n    sys.stdout.write('x' * 100000)\n    return a + b"
    reward, info = score_program(source, ADD_TESTS, timeout_s=10, memory_mb=256)
    assert reward == 1.0 and info["passed"] == 3


def test_sandbox_kills_an_infinite_loop_and_keeps_earlier_test_results():
    start = time.perf_counter()
    source = "def f(x):\n    while x:\n        pass\n    return 1"
    reward, info = score_program(
        source, ["assert f(0) == 1", "assert f(1) == 1"], timeout_s=1.5, memory_mb=256
    )
    assert time.perf_counter() - start < 10
    assert info["sandbox"] == "timeout" and reward == 0.5


def test_sandbox_stops_a_memory_hog():
    result = run_python("x = []\nwhile True:\n    x.append(bytearray(16 << 20))", timeout_s=20, memory_mb=200)
    assert result.outcome == "memory"
    reward, info = score_program(
        "blob = bytearray(4 << 30)\ndef f():\n    return 1", ["assert f() == 1"], timeout_s=10, memory_mb=200
    )
    assert reward == 0.0 and info["solution_error"] == "MemoryError"


def test_sandbox_child_has_no_parent_environment(monkeypatch):
    monkeypatch.setenv("MSA_SECRET_FOR_TEST", "visible")
    result = run_python("import os\nprint(os.environ.get('MSA_SECRET_FOR_TEST'))", timeout_s=5)
    assert result.stdout.strip() == "None"


def test_prompts_load_from_jsonl_and_parquet_with_a_field_mapping(tmp_path):
    rows = [{"q": f"question {i}", "a": str(i), "extra": i} for i in range(5)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = RLConfig.from_dict(
        {"data": {"path": str(tmp_path / "p.jsonl"), "fields": {"question": "q", "answer": "a"}}}
    ).data
    loaded = load_prompts(section)
    assert loaded[3] == {"question": "question 3", "answer": "3", "extra": 3}
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    section = RLConfig.from_dict(
        {"data": {"path": str(tmp_path / "p.parquet"), "fields": {"question": "q"}}}
    ).data
    assert load_prompts(section)[1]["question"] == "question 1"
    bad = RLConfig.from_dict(
        {"data": {"path": str(tmp_path / "p.jsonl"), "fields": {"question": "nope"}}}
    ).data
    with pytest.raises(ConfigError, match="nope"):
        load_prompts(bad)


def test_sampler_position_resumes_the_same_order():
    rows = [{"i": i} for i in range(5)]
    a = PromptSampler(rows, seed=3)
    first = [p.uid for p in a.take(7)]
    assert sorted(first[:5]) == list(range(5))  # one epoch visits every row once
    b = PromptSampler(rows, seed=3)
    b.load_state(a.state())
    assert [p.uid for p in a.take(6)] == [p.uid for p in b.take(6)]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="rollout.group_size"):
        RLConfig.from_dict({"data": {"path": "x.jsonl"}, "rollout": {"group_size": 1}})
    with pytest.raises(ConfigError, match="algorithm.name"):
        RLConfig.from_dict({"data": {"path": "x.jsonl"}, "algorithm": {"name": "dpo"}})
    with pytest.raises(ConfigError, match="algorithm.indexer_kl_coef"):
        RLConfig.from_dict({"data": {"path": "x.jsonl"}, "algorithm": {"indexer_kl_coef": -1.0}})
    with pytest.raises(ConfigError, match="trainer.grad_accum_steps"):
        RLConfig.from_dict(
            {
                "data": {"path": "x.jsonl"},
                "rollout": {"prompts_per_step": 3, "group_size": 3},
                "trainer": {"grad_accum_steps": 2},
            }
        )
    with pytest.raises(ConfigError, match="unknown field"):
        RLConfig.from_dict({"data": {"path": "x.jsonl"}, "run": {"stepz": 3}})
    with pytest.raises(ConfigError, match="env.name"):
        RLConfig.from_dict({"data": {"path": "x.jsonl"}, "env": {"name": "chess"}})


@pytest.mark.parametrize("name", ["rl_tiny.yaml", "rl_gpu.yaml"])
def test_shipped_configs_load(name):
    config = load_rl_config(f"examples/{name}")
    assert config.rollout.group_size >= 2
