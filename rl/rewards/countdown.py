"""Countdown: reach a target number with arithmetic on given numbers, each used exactly once (TinyZero's task).

Every generated instance is solvable (the target is built from a random expression over the numbers). The verifier
parses the answer with `ast` (numbers, + - * /, parentheses, nothing else) and evaluates it exactly with fractions.
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction
from typing import List, Optional

from .base import RewardResult, Task, answer_section, register_task

INSTRUCTION = "Use each number exactly once with + - * / and parentheses. End your reply with 'Answer: <expression>'."
_ANSWER_RE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def make_instance(rng: random.Random, count: int = 3, high: int = 30) -> dict:
    """Numbers and a target reachable from them with integer intermediate results in [1, 999]."""
    while True:
        numbers = [rng.randint(1, high) for _ in range(count)]
        order = numbers[:]
        rng.shuffle(order)
        value = order[0]
        ok = True
        for n in order[1:]:
            op = rng.choice("+-*/")
            if op == "/" and (n == 0 or value % n):
                op = "+"
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else value}[op]
            if not 1 <= value <= 999:
                ok = False
                break
        if ok:
            return {"numbers": numbers, "target": value}


def evaluate_expression(text: str) -> tuple:
    """(value as Fraction, numbers used) of an arithmetic expression, or raise ValueError naming the problem."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an expression: {exc.msg}") from None
    used: List[int] = []

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"only integers, + - * / and parentheses are allowed (found {type(node).__name__})")

    if len(text) > 200:
        raise ValueError("expression longer than 200 characters")
    return walk(tree), used


def check_countdown(numbers: List[int], target: int, expression: str) -> tuple:
    """(correct, reason)."""
    try:
        value, used = evaluate_expression(expression)
    except ValueError as exc:
        return False, str(exc)
    if sorted(used) != sorted(numbers):
        return False, f"uses {sorted(used)}, must use exactly {sorted(numbers)}"
    if value != target:
        return False, f"evaluates to {value}, not {target}"
    return True, "ok"


def extract_expression(answer_text: str) -> Optional[str]:
    matches = _ANSWER_RE.findall(answer_text)
    return matches[-1].strip().rstrip(".") if matches else None


@register_task
class CountdownTask(Task):
    name = "countdown"

    def prompts(self, split: str, n: int, seed: int) -> List[dict]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"countdown-{split}-{seed}")  # string seeds hash stably across processes
        records = []
        for i in range(n):
            inst = make_instance(rng)
            question = f"Numbers: {', '.join(map(str, inst['numbers']))}. Target: {inst['target']}."
            records.append(
                {
                    "task": self.name,
                    "id": f"countdown-{split}-{seed}-{i}",
                    "question": question,
                    "messages": [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}],
                    **inst,
                }
            )
        return records

    def score(self, record: dict, completion: str) -> RewardResult:
        expression = extract_expression(answer_section(record, completion))
        if expression is None:
            return RewardResult(0.0, correct=False, info={"reason": "no 'Answer:' line"})
        correct, reason = check_countdown(record["numbers"], record["target"], expression)
        return RewardResult(float(correct), correct=correct, info={"reason": reason, "expression": expression})
