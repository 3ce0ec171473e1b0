"""lm-evaluation-harness: the local tasks (generation, multiple choice, rolling perplexity) through
`latentforge-eval` on a DCP checkpoint give the numbers lm-eval's stock `hf` model (transformers, the independent
reference) gives on the Hugging Face export: per-document log-likelihoods within fp32 rounding, identical
generations, identical accuracies."""

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from latentforge.model import HybridModel
from latentforge.model.hf import export_dcp_checkpoint
from tests.model.test_hf import randomize, tiny_config
from tests.train.test_lora_base import write_dcp

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TASKS = ["lf_arith", "lf_choice", "lf_text"]
LIMIT = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A DCP checkpoint of a small random model with a BPE trained on the task-like text, and its export."""
    from latentforge.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("eval")
    corpus = ["Question: 12 + 30 =\nAnswer: 42\nWhat is 7 plus 8? The river flows to the sea. " * 30]
    tokenizer = train_bpe(corpus, 320, str(root / "bpe" / "tokenizer.json"))
    torch.manual_seed(0)
    model = HybridModel(tiny_config(pattern="M*E-", vocab_size=320, moe_latent_size=24, mtp_depths=0)).eval()
    randomize(model)
    checkpoint = write_dcp(model, root / "run" / "checkpoints" / "step_00000001", tokenizer.path)
    export = export_dcp_checkpoint(checkpoint, root / "hf")
    return root / "run", export


def hf_lm(export):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32, experts_implementation="eager")
    for module in model.modules():
        if hasattr(module, "time_step_limit"):
            module.time_step_limit = (0.0, float("inf"))  # transformers' CPU path clamps dt at 1e-3 otherwise
    # batch size 1: transformers' Mamba path is not exact under left padding; ours batches (right padding)
    return HFLM(pretrained=model.eval(), tokenizer=AutoTokenizer.from_pretrained(str(export)), batch_size=1)


def per_document(results: dict) -> dict:
    """{task: [per-document responses]} in document order."""
    out = {}
    for task, samples in results["samples"].items():
        out[task] = [sample["resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
    return out


def flatten(value):
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in flatten(v)]
    return [value]


@pytest.fixture(scope="module")
def both(checkpoints, tmp_path_factory):
    from latentforge.rl.evaluation import main
    from latentforge.train.eval_harness import run_tasks

    run_dir, export = checkpoints
    out = tmp_path_factory.mktemp("results") / "ours.json"
    assert (
        main(
            [
                str(run_dir),
                "--tasks",
                ",".join(TASKS),
                "--limit",
                str(LIMIT),
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--log-samples",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    ours = json.loads(out.read_text())
    theirs = run_tasks(hf_lm(export), TASKS, limit=LIMIT, log_samples=True)
    return ours, theirs


def test_generations_and_log_likelihoods_equal_stock_hf(both):
    ours, theirs = both
    theirs_docs = per_document(theirs)
    for task in TASKS:
        mine = [sample["resps"] for sample in sorted(ours["samples"][task], key=lambda s: s["doc_id"])]
        assert 0 < len(mine) == len(theirs_docs[task]) <= LIMIT
        for a, b in zip(flatten(mine), flatten(theirs_docs[task])):
            if isinstance(b, str) and not b.replace(".", "").replace("-", "").isdigit():
                assert a == b, task  # a generation
            elif isinstance(b, bool) or b in ("True", "False"):
                assert str(a) == str(b), task  # is-greedy flag
            else:
                assert math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-4), (task, a, b)


def test_metrics_equal_stock_hf(both):
    from latentforge.train.eval_harness import task_metrics

    ours, theirs = both
    theirs = task_metrics(theirs)
    assert set(ours["metrics"]) == set(TASKS)
    for task in TASKS:
        assert ours["metrics"][task].keys() == theirs[task].keys()
        for metric, value in theirs[task].items():
            assert math.isclose(ours["metrics"][task][metric], value, rel_tol=1e-5), (task, metric)
    assert 0 < ours["metrics"]["lf_text"]["word_perplexity"] < math.inf


def test_an_export_evaluates_like_its_checkpoint(checkpoints, both):
    from latentforge.rl.evaluation import LatentForgeLM
    from latentforge.train.eval_harness import run_tasks, task_metrics

    _, export = checkpoints
    ours, _ = both
    from_export = task_metrics(
        run_tasks(LatentForgeLM(str(export), batch_size=3), ["lf_choice", "lf_text"], limit=LIMIT)
    )
    for task in ("lf_choice", "lf_text"):
        for metric, value in from_export[task].items():
            assert math.isclose(ours["metrics"][task][metric], value, rel_tol=1e-5), (task, metric)


def _parallel_metrics(rank, world_size, checkpoint, layout):
    from latentforge.rl.parallel_evaluation import parallel_lm
    from latentforge.train.eval_harness import run_tasks, task_metrics

    lm = parallel_lm(checkpoint, layout, micro_batch_size=2, max_length=64)
    results = run_tasks(lm, ["lf_choice", "lf_text"], limit=LIMIT)
    return task_metrics(results) if rank == 0 else results  # lm-eval reports on LOCAL_RANK 0 only


@pytest.mark.slow
def test_parallel_layout_evaluates_like_one_device(checkpoints):
    from latentforge.rl.evaluation import LatentForgeLM
    from latentforge.train.eval_harness import run_tasks, task_metrics
    from tests.distributed import run_distributed

    run_dir, _ = checkpoints
    expected = task_metrics(
        run_tasks(LatentForgeLM(str(run_dir), max_length=64), ["lf_choice", "lf_text"], limit=LIMIT)
    )
    got, other = run_distributed(_parallel_metrics, 2, str(run_dir), {"tp": 2})
    assert other is None
    for task, values in expected.items():
        for metric, value in values.items():
            assert math.isclose(got[task][metric], value, rel_tol=1e-5), (task, metric, got[task][metric], value)


GENERATION_LIMIT = 8


def generations_by_doc(samples) -> list:
    """(doc id, raw generations, filtered answers) per document, in document order."""
    return [(s["doc_id"], s["resps"], s["filtered_resps"]) for s in sorted(samples, key=lambda s: s["doc_id"])]


def _parallel_generations(rank, world_size, checkpoint, layout):
    from latentforge.rl.parallel_evaluation import parallel_lm
    from latentforge.train.eval_harness import run_tasks

    lm = parallel_lm(checkpoint, layout, micro_batch_size=2, max_length=64, max_batch=3)
    results = run_tasks(lm, ["lf_arith"], limit=GENERATION_LIMIT, log_samples=True)
    # every rank's own generations (lm-eval reports on rank 0 only), straight from the model
    requests = [
        (f"Question: {a} + {b} =\nAnswer:", {"until": ["\n"], "max_gen_toks": 6}) for a, b in [(3, 4), (10, 31)]
    ]
    from latentforge.rl.evaluation import generate_texts

    own = generate_texts(lm, lm._generation_model, 2, requests) if lm.runner.dp_size == 1 else None
    return (results and results["samples"]["lf_arith"]), own


def test_a_share_of_sampled_requests_draws_what_one_device_draws(checkpoints):
    """Under DP each rank generates a share of lm-eval's requests; a sampled request is seeded by its position in
    the whole list, so the share draws the same tokens as the one-device run (and a different seed would not)."""
    from latentforge.rl.evaluation import LatentForgeLM, generate_texts

    run_dir, _ = checkpoints
    lm = LatentForgeLM(str(run_dir), max_length=64)
    sampled = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.5}
    requests = [(f"Question: {a} + {b} =\nAnswer:", sampled) for a, b in [(3, 4), (10, 31), (5, 5), (2, 9)]]
    whole = generate_texts(lm, lm.model, 4, requests)
    share = [1, 3]
    assert generate_texts(lm, lm.model, 4, [requests[i] for i in share], share) == [whole[i] for i in share]
    assert generate_texts(lm, lm.model, 4, [requests[i] for i in share]) != [whole[i] for i in share]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [{"tp": 2}, {"dp_shard": 2}, {"tp": 2, "dp_shard": 2}], ids=["tp2", "dp2", "tp2xdp2"]
)
def test_parallel_generation_equals_one_device(checkpoints, layout):
    """Greedy generations of the generative task under TP=2, DP=2 and TP=2 x DP=2 are token-identical to one
    process (and on every TP rank), and so are its metrics."""
    from latentforge.rl.evaluation import LatentForgeLM
    from latentforge.train.eval_harness import run_tasks, task_metrics
    from tests.distributed import run_distributed

    run_dir, _ = checkpoints
    reference = run_tasks(
        LatentForgeLM(str(run_dir), max_length=64), ["lf_arith"], limit=GENERATION_LIMIT, log_samples=True
    )
    world_size = math.prod(layout.values())
    (samples, own0), *others = run_distributed(_parallel_generations, world_size, str(run_dir), layout)
    assert all(other is None for other, _ in others)  # lm-eval reports on rank 0 only
    assert generations_by_doc(samples) == generations_by_doc(reference["samples"]["lf_arith"])
    assert len(samples) == GENERATION_LIMIT
    assert all(own == own0 for _, own in others)  # the TP ranks agree (None under DP)
    assert any(resp[0][0] for resp in [s["resps"] for s in samples])  # something was generated
    got = {s["doc_id"]: s["exact_match"] for s in samples}
    expected = task_metrics(reference)["lf_arith"]["exact_match"]
    assert math.isclose(sum(got.values()) / len(got), expected)


def _cli_under_layout(rank, world_size, checkpoint, out):
    from latentforge.rl.evaluation import main

    args = ["--tasks", "lf_arith,lf_choice", "--limit", "4", "--max-length", "64", "--batch-size", "2"]
    return main([checkpoint, *args, "--parallel", "tp=2", "--log-samples", "--output", out])


@pytest.mark.slow
def test_cli_runs_generative_and_choice_tasks_under_tp(checkpoints, tmp_path):
    """`latentforge-eval CKPT --parallel tp=2` (two processes) writes the one-device generations, log-likelihoods
    and metrics."""
    from latentforge.rl.evaluation import LatentForgeLM
    from latentforge.train.eval_harness import run_tasks, task_metrics
    from tests.distributed import run_distributed

    run_dir, _ = checkpoints
    out = tmp_path / "tp2.json"
    assert run_distributed(_cli_under_layout, 2, str(run_dir), str(out)) == [0, 0]
    got = json.loads(out.read_text())
    tasks = ["lf_arith", "lf_choice"]
    expected = run_tasks(LatentForgeLM(str(run_dir), max_length=64), tasks, limit=4, log_samples=True)
    assert generations_by_doc(got["samples"]["lf_arith"]) == generations_by_doc(expected["samples"]["lf_arith"])
    for task in tasks:
        for metric, value in task_metrics(expected)[task].items():
            assert math.isclose(got["metrics"][task][metric], value, rel_tol=1e-5), (task, metric)
    mine = flatten([s["resps"] for s in sorted(got["samples"]["lf_choice"], key=lambda s: s["doc_id"])])
    reference = flatten([s["resps"] for s in sorted(expected["samples"]["lf_choice"], key=lambda s: s["doc_id"])])
    for a, b in zip(mine, reference):
        if isinstance(b, bool) or b in ("True", "False"):
            assert str(a) == str(b)
        else:
            assert math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-4)


def test_generation_under_pipeline_parallel_fails_in_one_line(checkpoints, capsys):
    from latentforge.rl.evaluation import main

    run_dir, _ = checkpoints
    with pytest.raises(SystemExit) as failure:
        main([str(run_dir), "--tasks", "lf_arith,lf_choice", "--parallel", "pp=2"])
    message = str(failure.value)
    assert message.count("\n") == 0
    assert "lf_arith" in message and "pp=2" in message and "use tp" in message and "lf_choice" not in message


@pytest.mark.parametrize("thinking", [None, False])
def test_chat_template_path_equals_stock_hf(checkpoints, thinking):
    """--apply_chat_template: prompts through the export's template (generation prompt; multiple choice continues
    the final message), the reasoning switch passed as lm-eval's hf model passes it."""
    from latentforge.rl.evaluation import LatentForgeLM
    from latentforge.train.eval_harness import run_tasks

    run_dir, export = checkpoints
    theirs_lm = hf_lm(export)
    if thinking is not None:
        theirs_lm.chat_template_args = {"enable_thinking": thinking}
    tasks = ["lf_arith", "lf_choice"]
    ours = run_tasks(
        LatentForgeLM(str(run_dir), batch_size=4, enable_thinking=thinking),
        tasks,
        limit=4,
        log_samples=True,
        apply_chat_template=True,
    )
    theirs = run_tasks(theirs_lm, tasks, limit=4, log_samples=True, apply_chat_template=True)
    for task in tasks:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        reference = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["arguments"] for s in mine] == [s["arguments"] for s in reference]  # the same rendered prompts
        for a, b in zip(flatten([s["resps"] for s in mine]), flatten([s["resps"] for s in reference])):
            if isinstance(b, str):
                assert a == b, task
            else:
                assert math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-4), (task, a, b)


def _lm_eval_cli(script: str, args: list, cwd) -> subprocess.CompletedProcess:
    """Run a console script's target ("module:function") as the installed script would, in a subprocess."""
    module, _, function = script.partition(":")
    code = f"import sys; sys.argv[0] = 'lm_eval'; from {module} import {function}; sys.exit({function}())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_lm_eval_cli_selects_the_latentforge_model(checkpoints, tmp_path):
    """`latentforge-lm-eval` (pyproject's console script: lm-eval's own CLI and flags) runs `--model latentforge`
    and gives the generations and log-likelihoods of the in-process model; stock `lm_eval` does not find the model
    (it reads no plugin entry points: the reason the command exists)."""
    from latentforge.rl.evaluation import LatentForgeLM
    from latentforge.train.eval_harness import run_tasks

    run_dir, _ = checkpoints
    repo = Path(__file__).resolve().parents[2]
    script = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]["latentforge-lm-eval"]
    tasks = ["lf_arith", "lf_choice"]
    flags = ["--model", "latentforge", "--model_args", f"checkpoint={run_dir},max_length=64", "--batch_size", "4"]
    flags += ["--tasks", ",".join(tasks), "--include_path", str(repo / "data" / "eval_tasks"), "--limit", "4"]
    run = _lm_eval_cli(script, [*flags, "--output_path", str(tmp_path), "--log_samples"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = run_tasks(LatentForgeLM(str(run_dir), max_length=64, batch_size=4), tasks, limit=4, log_samples=True)
    for task in tasks:
        (samples_file,) = tmp_path.glob(f"*/samples_{task}_*.jsonl")
        got = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert len(got) == 4
        for a, b in zip(
            flatten([s["resps"] for s in sorted(got, key=lambda s: s["doc_id"])]),
            flatten([s["resps"] for s in sorted(expected["samples"][task], key=lambda s: s["doc_id"])]),
        ):
            assert str(a) == str(b), task  # the same text, or the same log-likelihood as JSON writes it

    stock = _lm_eval_cli("lm_eval.__main__:cli_evaluate", flags, tmp_path)
    assert stock.returncode != 0 and "no model for this name found" in stock.stderr
