"""Small generated datasets for the three shipped environments (``examples/data/*.jsonl``).

python -m msa.rl.envs.datasets examples/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any


def repeat_char_rows(count: int, alphabet: str = "ab", seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        target = rng.choice(alphabet)
        rows.append({"prompt": f"Repeat the character {target}", "target": target})
    return rows


def arithmetic_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 50)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op] + c
        rows.append({"question": f"What is {a} {op} {b} + {c}?", "answer": str(value)})
    return rows


_CODING_TASKS = [
    (
        "add(a, b)",
        "returns the sum of a and b",
        ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"],
    ),
    (
        "is_even(n)",
        "returns True when n is even",
        ["assert is_even(2)", "assert not is_even(3)", "assert is_even(0)"],
    ),
    (
        "reverse(s)",
        "returns the string s reversed",
        ["assert reverse('abc') == 'cba'", "assert reverse('') == ''", "assert reverse('a') == 'a'"],
    ),
    (
        "maximum(xs)",
        "returns the largest element of the list xs",
        ["assert maximum([1, 3, 2]) == 3", "assert maximum([-5]) == -5", "assert maximum([0, 0]) == 0"],
    ),
    (
        "count_vowels(s)",
        "returns how many of the characters of s are vowels (aeiou)",
        [
            "assert count_vowels('hello') == 2",
            "assert count_vowels('xyz') == 0",
            "assert count_vowels('aeiou') == 5",
        ],
    ),
    (
        "square(n)",
        "returns n times n",
        ["assert square(3) == 9", "assert square(-2) == 4", "assert square(0) == 0"],
    ),
]


def coding_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        signature, behaviour, tests = rng.choice(_CODING_TASKS)
        prompt = f"Write a Python function {signature} that {behaviour}. Reply with a ```python block."
        rows.append({"prompt": prompt, "tests": list(tests)})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_examples(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    files = {
        "repeat_char.jsonl": repeat_char_rows(256),
        "arithmetic.jsonl": arithmetic_rows(256),
        "coding.jsonl": coding_rows(64),
    }
    for name, rows in files.items():
        write_jsonl(directory / name, rows)
    return [directory / name for name in files]


if __name__ == "__main__":
    for written in write_examples(sys.argv[1] if len(sys.argv) > 1 else "examples/data"):
        print(written)
