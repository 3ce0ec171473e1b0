"""`builtin:tool_chat`: generated transcripts of correct tool use, to teach the tool-call format before RL.

Two kinds, in the chat layout of data/chat.py (tool calls in assistant turns, `tool` role answers):

- python (3 of 4): a word problem of `data.synthetic` (the same train / valid / test split as
  builtin:arithmetic_chat and the `python_tool` environment, so held-out problems stay held out); the assistant
  calls the `python` tool with `print(<expression>)`, reads the output and answers 'Answer: N'. One in ten first
  calls has a typo and the transcript shows the error observation and the fixed call.
- guess (1 of 4): guess-the-number with the `check` tool, found by bisection.

Tool outputs are exactly what the built-in environments answer (rl/envs/python_tool.py and guess.py;
tests/data/test_tool_chat.py replays transcripts through them).
"""

from __future__ import annotations

import json
import random
from typing import Dict, List

from latentforge.data.synthetic import INSTRUCTION, synthetic_splits
from latentforge.data.util import derive_seed

TOOL_CHAT_VERSION = 1  # bump when the transcripts change (part of tokenization cache keys)
PYTHON_SYSTEM = (
    "You can run Python with the python tool: "
    '<tool_call>{"name": "python", "arguments": {"code": "print(2 + 3)"}}</tool_call> '
    "It replies with what the program prints. Compute with it, then reply 'Answer: <number>'."
)
GUESS_PROMPT = (
    "I picked an integer from {low} to {high}. Guess it with the check tool: "
    '<tool_call>{{"name": "check", "arguments": {{"guess": 50}}}}</tool_call> '
    "replies higher, lower or correct."
)
GUESS_RANGES = (10, 20, 50, 100)
TYPO_ERROR = "error: exit code 1: NameError: name 'prnt' is not defined. Did you mean: 'print'?"  # Python >= 3.10


def _call(name: str, **arguments) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": arguments}]}


def python_transcript(problem: dict, typo: bool = False) -> List[dict]:
    code = f"print({problem['expression']})"
    messages = [
        {"role": "system", "content": PYTHON_SYSTEM},
        {"role": "user", "content": f"{problem['question']}\n{INSTRUCTION}"},
    ]
    first = dict(_call("python", code=code), reasoning_content=f"I will compute {problem['expression']} in Python.")
    if typo:
        messages += [
            dict(_call("python", code="prnt" + code[5:]), reasoning_content=first["reasoning_content"]),
            {"role": "tool", "content": TYPO_ERROR},
            dict(_call("python", code=code), reasoning_content="A typo: print, not prnt."),
        ]
    else:
        messages.append(first)
    messages += [
        {"role": "tool", "content": str(problem["answer"])},
        {
            "role": "assistant",
            "content": f"Answer: {problem['answer']}",
            "reasoning_content": f"The program printed {problem['answer']}.",
        },
    ]
    return messages


def guess_transcript(high: int, target: int, low: int = 1) -> List[dict]:
    messages = [{"role": "user", "content": GUESS_PROMPT.format(low=low, high=high)}]
    lo, hi = low, high
    while True:
        guess = (lo + hi) // 2
        messages.append(dict(_call("check", guess=guess), reasoning_content=f"It is from {lo} to {hi}: try {guess}."))
        reply = "correct" if guess == target else ("higher" if target > guess else "lower")
        messages.append({"role": "tool", "content": reply})
        if reply == "correct":
            messages.append(
                {"role": "assistant", "content": f"Answer: {target}", "reasoning_content": f"{guess} is correct."}
            )
            return messages
        lo, hi = (guess + 1, hi) if reply == "higher" else (lo, guess - 1)


def tool_chat_splits(num_train: int, num_heldout: int, seed: int = 0) -> Dict[str, List[dict]]:
    """train / valid / test lists of {"id", "kind", "messages"}: one transcript per problem of the synthetic
    split (python), and one guess game after every third problem."""
    out = {}
    for split, problems in synthetic_splits(num_train, num_heldout, seed).items():
        rng = random.Random(derive_seed("tool_chat", TOOL_CHAT_VERSION, seed, split))
        records = []
        for i, p in enumerate(problems):
            records.append(
                {"id": f"python-{p['id']}", "kind": "python", "messages": python_transcript(p, typo=rng.random() < 0.1)}
            )
            if i % 3 == 2:
                high = rng.choice(GUESS_RANGES)
                records.append(
                    {
                        "id": f"guess-{split}-{i}",
                        "kind": "guess",
                        "messages": guess_transcript(high, rng.randint(1, high)),
                    }
                )
        out[split] = records
    return out


def dumps(record: dict) -> str:
    """One JSONL line (`{"messages": [...]}`), for writing the set out: `python -m latentforge.data.tool_chat`."""
    return json.dumps({"messages": record["messages"]}, ensure_ascii=False)


if __name__ == "__main__":
    for r in tool_chat_splits(20, 5)["train"][:4]:
        print(dumps(r))
