import re

from latentforge.data.synthetic import check_answer, extract_answer, generate_problems, synthetic_splits

_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (-?\d+)")


def test_deterministic_distinct_and_heldout_disjoint():
    a, b = synthetic_splits(300, 40, seed=3), synthetic_splits(300, 40, seed=3)
    assert a == b
    assert synthetic_splits(300, 40, seed=4)["train"] != a["train"]
    questions = {k: {p["question"] for p in v} for k, v in a.items()}
    assert len(questions["train"]) == 300 and len(questions["valid"]) == len(questions["test"]) == 40
    assert not (questions["train"] & questions["valid"]) and not (questions["train"] & questions["test"])
    assert not (questions["valid"] & questions["test"])


def test_worked_solutions_are_correct_arithmetic():
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for p in generate_problems(400, seed=0):
        steps = _EQ.findall(p["reasoning"])
        assert steps, p["reasoning"]
        for x, op, y, z in steps:  # every step of the worked solution is true
            assert ops[op](int(x), int(y)) == int(z), p
            if op == "/":
                assert int(x) % int(y) == 0
        assert int(steps[-1][3]) == p["answer"]  # and ends at the answer
        if p["kind"] == "expression":  # an independent evaluation of the question itself
            expr = p["question"][len("What is ") : -1]
            assert eval(expr) == p["answer"]  # noqa: S307 - digits and + - * only


def test_check_answer():
    p = generate_problems(1, seed=0)[0]
    n = p["answer"]
    assert check_answer(p, p["messages"][-1]["content"])
    assert check_answer(p, f"<think>maybe Answer: {n + 1}</think>The answer is {n}.")
    assert not check_answer(p, f"<think>Answer: {n}</think>Answer: {n + 1}")
    assert not check_answer(p, f"I think it is {n}")  # no final answer line
    assert check_answer({"answer": 12345}, "Answer: 12,345")
    assert extract_answer("Answer: -7") == -7
