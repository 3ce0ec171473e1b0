"""A generated chat dataset with verifiable answers: arithmetic and short word problems, each with a worked
solution. The default SFT data of the tiny recipes and, later, the GRPO prompts (rewarded by `check_answer`).

Deterministic: the same (seed, sizes) give the same problems on every machine. The held-out splits come from their
own seeds and no held-out question appears in the training split.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Dict, List, Optional, Sequence

from latentforge.data.util import derive_seed

GENERATOR_VERSION = 1  # bump when the problems change (part of tokenization cache keys)
INSTRUCTION = "Solve the problem. End your reply with 'Answer: <number>'."
_ANSWER_RE = re.compile(r"answer\s*(?:is|:|=)?\s*\**\s*(-?\d[\d,]*)", re.IGNORECASE)
_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ines", "Jonas", "Kemal", "Lea")
_ITEMS = ("apples", "marbles", "books", "stickers", "coins", "pencils", "shells", "cards")


def _expression(rng: random.Random) -> dict:
    a, b, c = rng.randint(2, 99), rng.randint(2, 20), rng.randint(2, 20)
    op = rng.choice(["+", "-"])
    product = b * c
    result = a + product if op == "+" else a - product
    steps = f"First the multiplication: {b} * {c} = {product}. Then {a} {op} {product} = {result}."
    return {
        "kind": "expression",
        "question": f"What is {a} {op} {b} * {c}?",
        "reasoning": steps,
        "answer": result,
        "expression": f"{a} {op} {b} * {c}",
    }


def _two_step(rng: random.Random) -> dict:
    a, b, c = rng.randint(10, 999), rng.randint(10, 999), rng.randint(10, 999)
    s1 = a + b
    result = s1 - c
    steps = f"{a} + {b} = {s1}. Then {s1} - {c} = {result}."
    return {
        "kind": "add_sub",
        "question": f"Compute {a} + {b} - {c}.",
        "reasoning": steps,
        "answer": result,
        "expression": f"{a} + {b} - {c}",
    }


def _buy_groups(rng: random.Random) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    have, bags, each = rng.randint(1, 50), rng.randint(2, 9), rng.randint(2, 12)
    extra = bags * each
    result = have + extra
    question = (
        f"{name} has {have} {item}. {name} buys {bags} bags with {each} {item} in each bag. "
        f"How many {item} does {name} have now?"
    )
    steps = f"The bags hold {bags} * {each} = {extra} {item}. {have} + {extra} = {result}."
    return {
        "kind": "word_groups",
        "question": question,
        "reasoning": steps,
        "answer": result,
        "expression": f"{have} + {bags} * {each}",
    }


def _share(rng: random.Random) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each, kept = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 9)
    shared = friends * each
    total = shared + kept
    question = (
        f"{name} has {total} {item}, keeps {kept} and shares the rest equally among {friends} friends. "
        f"How many {item} does each friend get?"
    )
    steps = f"{total} - {kept} = {shared} are shared. {shared} / {friends} = {each}."
    return {
        "kind": "word_share",
        "question": question,
        "reasoning": steps,
        "answer": each,
        "expression": f"({total} - {kept}) // {friends}",
    }


def _rectangle(rng: random.Random) -> dict:
    w, h = rng.randint(2, 40), rng.randint(2, 40)
    if rng.random() < 0.5:
        result = w * h
        question = f"A rectangle is {w} cm wide and {h} cm tall. What is its area in square centimetres?"
        steps = f"Area = width * height = {w} * {h} = {result}."
        kind = "area"
        expression = f"{w} * {h}"
    else:
        result = 2 * (w + h)
        question = f"A rectangle is {w} cm wide and {h} cm tall. What is its perimeter in centimetres?"
        steps = f"Perimeter = 2 * (width + height) = 2 * ({w} + {h}) = 2 * {w + h} = {result}."
        kind = "perimeter"
        expression = f"2 * ({w} + {h})"
    return {"kind": kind, "question": question, "reasoning": steps, "answer": result, "expression": expression}


def _minutes(rng: random.Random) -> dict:
    name = rng.choice(_NAMES)
    hours, minutes, more = rng.randint(1, 5), rng.randint(0, 59), rng.randint(5, 90)
    start = hours * 60 + minutes
    result = start + more
    question = (
        f"{name} reads for {hours} hours and {minutes} minutes, then {more} minutes more. "
        f"How many minutes does {name} read in total?"
    )
    steps = (
        f"{hours} hours = {hours} * 60 = {hours * 60} minutes, plus {minutes} is {start}. {start} + {more} = {result}."
    )
    return {
        "kind": "minutes",
        "question": question,
        "reasoning": steps,
        "answer": result,
        "expression": f"{hours} * 60 + {minutes} + {more}",
    }


GENERATORS: Sequence[Callable[[random.Random], dict]] = (
    _expression,
    _two_step,
    _buy_groups,
    _share,
    _rectangle,
    _minutes,
)


def generate_problems(n: int, seed: int, exclude: Optional[set] = None) -> List[dict]:
    """`n` distinct problems (no question repeated or in `exclude`), each {"id", "kind", "question", "reasoning",
    "answer" (int), "expression" (Python that evaluates to the answer), "messages"}."""
    rng = random.Random(derive_seed("synthetic", GENERATOR_VERSION, seed))
    exclude = set() if exclude is None else exclude
    seen, out = set(), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct problems (got {len(out)})")
        p = rng.choice(GENERATORS)(rng)
        if p["question"] in seen or p["question"] in exclude:
            continue
        seen.add(p["question"])
        p["id"] = f"{seed}-{len(out)}"
        p["messages"] = problem_messages(p)
        out.append(p)
    return out


def problem_messages(problem: dict, with_solution: bool = True) -> List[dict]:
    """The chat form: the user asks, the assistant reasons then answers 'Answer: N'."""
    messages = [{"role": "user", "content": f"{problem['question']}\n{INSTRUCTION}"}]
    if with_solution:
        messages.append(
            {"role": "assistant", "content": f"Answer: {problem['answer']}", "reasoning_content": problem["reasoning"]}
        )
    return messages


def synthetic_splits(num_train: int, num_heldout: int, seed: int = 0) -> Dict[str, List[dict]]:
    """train / valid / test problem lists; valid and test (num_heldout each) are disjoint from train."""
    test = generate_problems(num_heldout, derive_seed(seed, "test"))
    valid = generate_problems(num_heldout, derive_seed(seed, "valid"), exclude={p["question"] for p in test})
    heldout = {p["question"] for p in test} | {p["question"] for p in valid}
    train = generate_problems(num_train, derive_seed(seed, "train"), exclude=heldout)
    return {"train": train, "valid": valid, "test": test}


def extract_answer(completion_text: str) -> Optional[int]:
    """The integer after the last 'Answer:' outside any <think> block, or None."""
    text = re.sub(r"<think>.*?(</think>|$)", "", completion_text, flags=re.DOTALL)
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    try:
        return int(matches[-1].replace(",", ""))
    except ValueError:
        return None


def check_answer(problem: dict, completion_text: str) -> bool:
    """True when the completion's final 'Answer: N' equals the problem's answer."""
    return extract_answer(completion_text) == int(problem["answer"])
