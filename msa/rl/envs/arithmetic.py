"""Arithmetic word problems with a calculator tool; reward 1 when the final answer is exact."""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any

from msa.rl.envs.base import Environment, StepResult, require_field
from msa.rl.envs.tools import function_schema, parse_tool_calls, strip_tool_calls, tool_message

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 64
_MAX_LENGTH = 200
# Integers are exact and unbounded in Python: a few nested powers would build numbers of millions of
# digits, holding the GIL (and with it the rollout's event loop) for seconds. Every integer product
# and power is sized before it is computed and refused beyond this many digits.
_MAX_DIGITS = 1000
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class CalculatorError(ValueError):
    pass


def calculate(expression: str) -> int | float:
    """Evaluate numbers, + - * / // % ** and parentheses, nothing else (no names, no calls)."""
    if len(expression) > _MAX_LENGTH:
        raise CalculatorError(f"expression longer than {_MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not an arithmetic expression: {e.msg}") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise CalculatorError(f"exponent above {_MAX_EXPONENT}")
        _check_size(node.op, left, right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result out of the range of a float") from None
        if isinstance(value, complex):
            raise CalculatorError("the result is not a real number")
        return value
    raise CalculatorError(f"unsupported element {type(node).__name__}")


def _digits(value: int) -> float:
    return math.log10(abs(value)) + 1 if value else 1.0


def _check_size(op: ast.operator, left: int | float, right: int | float) -> None:
    """Refuse an integer product or power whose result would exceed ``_MAX_DIGITS`` digits."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return  # float results overflow to an error or inf instead of growing
    if isinstance(op, ast.Mult):
        digits = _digits(left) + _digits(right)
    elif isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        digits = right * math.log10(abs(left))
    else:
        return
    if digits > _MAX_DIGITS:
        raise CalculatorError(f"the result would have more than {_MAX_DIGITS} digits")


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


class ArithmeticEnv(Environment):
    """Sample fields: ``question`` and ``answer``. A turn with tool calls gets their results; the
    first turn without any is the final answer, whose last number is compared with ``answer``."""

    tools = [
        function_schema(
            "calculator",
            "Evaluate an arithmetic expression.",
            {"expression": {"type": "string", "description": "e.g. (17 * 23) + 4"}},
        )
    ]

    def __init__(
        self, system_prompt: str = "Solve the problem. Use the calculator, then state the answer."
    ) -> None:
        self.system_prompt = system_prompt
        self.answer = ""

    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        self.answer = str(require_field(sample, "answer", "arithmetic")).strip()
        question = require_field(sample, "question", "arithmetic")
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]

    def step(self, text: str) -> StepResult:
        calls = parse_tool_calls(text)
        if calls:
            return StepResult(
                observations=[tool_message(self._run(call)) for call in calls],
                done=False,
                info={"tool_calls": len(calls)},
            )
        numbers = _NUMBER.findall(strip_tool_calls(text))
        correct = bool(numbers) and numbers[-1] == self.answer
        return StepResult(reward=1.0 if correct else 0.0, done=True, info={"answered": bool(numbers)})

    @staticmethod
    def _run(call) -> str:
        if call.error:
            return f"error: {call.error}"
        if call.name != "calculator":
            return f"error: unknown tool {call.name!r}; available: calculator"
        expression = call.arguments.get("expression")
        if not isinstance(expression, str):
            return 'error: "expression" must be a string'
        try:
            return _format(calculate(expression))
        except (ArithmeticError, ValueError, RecursionError, MemoryError) as e:
            return f"error: {str(e) or type(e).__name__}"
