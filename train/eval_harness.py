"""lm-evaluation-harness on LatentForge models: log-likelihood from the model's own forward.

`LogLikelihoodLM` is an lm-eval `TemplateLM` that scores (context, continuation) pairs, rolling windows
(perplexity tasks) and multiple-choice options with exactly what lm-eval's stock `hf` model computes on the
Hugging Face export: the same tokenization (control-token names in task text are control tokens, as
`tokenizer(text)` reads them; no BOS added), the same truncation to `max_length`, the same prefix token for an
empty context (`<s>`, or `prefix_token_id`), log-softmax in fp32. Requests are batched longest first, right-padded
(the model is causal, so padding never changes a scored position).

Generation needs the inference engine (model/engine), which train/ must not import: `generate_until` here names the
command that has it (`latentforge-eval`, latentforge.rl.evaluation). Periodic evaluation during training
(train/callbacks/eval_tasks.py) therefore runs log-likelihood tasks only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F

from latentforge.data.tokenizer import SPECIAL_TOKENS

CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install 'latentforge[eval]' (or pip install lm-eval)"
        ) from None
    return TemplateLM


@torch.no_grad()
def score_continuations(
    forward: Callable, requests: Sequence[Tuple[List[int], List[int]]], max_length: int, batch_size: int, device
) -> List[Tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request, in
    order. `forward(ids)` returns logits (batch, time, vocab). Each sequence is context + continuation cut to its
    last `max_length` + 1 tokens, as lm-eval's `hf` model does."""
    rows = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("an lm-eval request with an empty continuation: nothing to score")
        rows.append((context + continuation)[-(max_length + 1) :][:-1])
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    results: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(rows[batch[0]])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : len(rows[i])] = torch.tensor(rows[i])
        logits = forward(ids.to(device))
        for r, i in enumerate(batch):
            target = torch.tensor(requests[i][1], device=logits.device)
            length, count = len(rows[i]), len(target)
            logprobs = F.log_softmax(logits[r, length - count : length].float(), dim=-1)
            greedy = bool((logprobs.argmax(-1) == target).all())
            results[i] = (float(logprobs.gather(-1, target[:, None]).sum()), greedy)
    return cast(List[Tuple[float, bool]], results)  # every index is filled above


def model_scorer(model, batch_size: int, device) -> Callable:
    """requests, max_length -> scores, from a plain HybridModel's forward."""

    def score(requests, max_length):
        return score_continuations(lambda ids: model(ids).logits, requests, max_length, batch_size, device)

    return score


class _RunnerScoring:
    """The runner's loss hook that scores instead of training: per request, the sum of log p(target) over its
    continuation positions and the count of positions whose argmax is not the target, as statistics (summed over
    context-parallel shards and data-parallel ranks by the runner)."""

    def __call__(self, out, mb):
        mask = mb["score_mask"].bool()
        hidden = out.hidden[mask]
        if hidden.shape[0] == 0:
            return out.hidden.sum() * 0.0, {}
        logprobs = F.log_softmax(F.linear(hidden, out.lm_head_weight).float(), dim=-1)
        targets = mb["targets"][mask]
        chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        misses = (logprobs.argmax(-1) != targets).double()
        rows = mb["request_id"][mask]
        stats = {}
        for rid in rows.unique().tolist():
            here = rows == rid
            stats[f"lp_{rid:07d}"] = chosen[here].double().sum()
            stats[f"miss_{rid:07d}"] = misses[here].sum()
        return out.hidden.sum() * 0.0, stats


def runner_scorer(runner, micro_batch_size: int, micro_batches: int, seq_len: int, device) -> Callable:
    """requests, max_length -> scores through a training runner (any parallel layout; every rank calls it with the
    same requests). Each `runner.evaluate` call takes `micro_batches` micro-batches of `micro_batch_size` rows of
    `seq_len` tokens per data-parallel rank (the shapes training uses, so every layout accepts them)."""

    def score(requests, max_length):
        rows = []
        for rid, (context, continuation) in enumerate(requests):
            whole = (context + continuation)[-(min(max_length, seq_len) + 1) :]
            rows.append((rid, whole[:-1], whole[1:], len(continuation)))
        per_call = micro_batch_size * micro_batches * runner.dp_size
        totals = {}
        for start in range(0, len(rows), per_call):
            chunk = rows[start : start + per_call]
            mine = [
                mb
                for i, mb in enumerate(_micro_batches(chunk, micro_batch_size, micro_batches * runner.dp_size, seq_len))
                if i % runner.dp_size == runner.dp_rank
            ]
            totals.update(runner.evaluate(mine, loss_fn=_RunnerScoring())["stats"])
        return [(totals[f"lp_{rid:07d}"], totals[f"miss_{rid:07d}"] == 0) for rid in range(len(requests))]

    return score


def _micro_batches(rows, size: int, count: int, seq_len: int) -> list:
    """`count` micro-batches of `size` right-padded rows; rows beyond the requests score nothing."""
    batches = []
    for m in range(count):
        ids = torch.zeros(size, seq_len, dtype=torch.long)
        targets = torch.zeros(size, seq_len, dtype=torch.long)
        score_mask = torch.zeros(size, seq_len)
        request_id = torch.full((size, seq_len), -1, dtype=torch.long)
        for r, (rid, inputs, outputs, scored) in enumerate(rows[m * size : (m + 1) * size]):
            n = len(inputs)
            ids[r, :n], targets[r, :n] = torch.tensor(inputs), torch.tensor(outputs)
            score_mask[r, n - scored : n] = 1
            request_id[r] = rid
        batches.append({"input_ids": ids, "targets": targets, "score_mask": score_mask, "request_id": request_id})
    return batches


class LogLikelihoodLM(_lm_eval()):
    """An lm-eval model over a LatentForge model: loglikelihood and loglikelihood_rolling."""

    def __init__(
        self,
        scorer: Callable,
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int = 2048,
        device: str | torch.device = "cpu",
        prefix_token_id: Optional[int] = None,
        max_gen_toks: int = 256,
        enable_thinking: Optional[bool] = None,
    ):
        super().__init__()
        self._scorer = scorer  # (requests, max_length) -> [(log-likelihood, is greedy)]: model_scorer, runner_scorer
        self.lf_tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length)
        self._device = torch.device(device)
        self.custom_prefix_token_id = prefix_token_id
        self.max_gen_toks = int(max_gen_toks)
        self.enable_thinking = enable_thinking

    # ----- what TemplateLM needs --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return SPECIAL_TOKENS["</s>"]

    @property
    def prefix_token_id(self) -> int:
        return SPECIAL_TOKENS["<s>"] if self.custom_prefix_token_id is None else int(self.custom_prefix_token_id)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.lf_tokenizer.spec.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.lf_tokenizer.encode_with_control_tokens(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        return self.lf_tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        results = self._scorer(pairs, self.max_length)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval import utils

        totals = []
        for (string,) in [request.args for request in requests]:
            windows = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, context, continuation) for context, continuation in windows])
            totals.append(sum(score for score, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        tasks = sorted({request.task_name for request in requests if getattr(request, "task_name", None)})
        raise NotImplementedError(
            f"generation tasks {tasks} need the inference engine, which training does not load: evaluate the "
            "checkpoint with latentforge-eval (or keep train.eval_tasks to log-likelihood tasks)"
        )

    # ----- chat (lm-eval --apply_chat_template) ----------------------------------------------------------------
    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """The chat as text, as lm-eval's hf model renders it with the export's template: with a generation
        prompt, or continuing the final message (transformers' `continue_final_message`: cut after its content).
        `enable_thinking` None: the template's default (on)."""
        from latentforge.data.chat import render_chat_text

        thinking = True if self.enable_thinking is None else bool(self.enable_thinking)
        if add_generation_prompt:
            return render_chat_text(chat_history, enable_thinking=thinking, add_generation_prompt=True)
        messages = [dict(m) for m in chat_history]
        messages[-1]["content"] = messages[-1]["content"] + CONTINUE_TAG
        text = render_chat_text(messages, enable_thinking=thinking)
        cut = text.rindex(CONTINUE_TAG.strip())
        return text[:cut] if text[cut : cut + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:cut].rstrip()

    def chat_template(self, chat_template=False) -> Optional[str]:
        from latentforge.data.chat_template import CHAT_TEMPLATE

        return CHAT_TEMPLATE if chat_template else None


def task_manager(tasks: Sequence[str], include_paths: Sequence[str] = ()):
    """lm-eval's TaskManager with LatentForge's local tasks and `include_paths` (folders of task YAML); lm-eval's
    own catalogue (thousands of YAML files, most of a minute to index) only when a task needs it."""
    import os

    from lm_eval.tasks import TaskManager

    local = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "eval_tasks")
    paths: List[str | Path] = [p for p in [local, *include_paths] if p]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(task in manager.all_tasks for task in tasks):
        return manager
    return TaskManager(include_path=paths)


def check_loglikelihood_tasks(tasks: Sequence[str], include_paths: Sequence[str] = ()) -> None:
    """Raise ValueError naming any task that is unknown or needs generation (not available during training)."""
    manager = task_manager(tasks, include_paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"train.eval_tasks: unknown lm-eval task(s) {unknown}; local tasks: "
            f"{sorted(manager.all_tasks)[:8]}..., or add a folder of task YAML to train.eval_include"
        )
    generating = generating_tasks(tasks, include_paths, manager)
    if generating:
        raise ValueError(
            f"train.eval_tasks: {generating} generate text, which needs the inference engine (not "
            "loaded during training): keep log-likelihood tasks here and run generation tasks with "
            "latentforge-eval on a checkpoint"
        )


def generating_tasks(tasks: Sequence[str], include_paths: Sequence[str] = (), manager=None) -> List[str]:
    """The names of the (sub)tasks among `tasks` that generate text (lm-eval's generate_until output type)."""
    from lm_eval.tasks import get_task_dict

    manager = manager or task_manager(tasks, include_paths)
    return sorted(
        name for name, task in _leaf_tasks(get_task_dict(list(tasks), manager)) if task.OUTPUT_TYPE == "generate_until"
    )


def _leaf_tasks(task_dict: dict):
    for name, task in task_dict.items():
        if isinstance(task, dict):
            yield from _leaf_tasks(task)
        else:
            yield getattr(name, "group", name) if not isinstance(name, str) else name, task


def run_tasks(
    lm,
    tasks: Sequence[str],
    *,
    limit=None,
    num_fewshot: Optional[int] = None,
    include_paths: Sequence[str] = (),
    log_samples: bool = False,
    apply_chat_template: bool = False,
    seed: int = 0,
) -> dict:
    """lm_eval.simple_evaluate on `lm`: its results dict (results per task, and samples when asked); None on the
    processes whose LOCAL_RANK is not 0 (lm-eval reports from one process)."""
    from lm_eval import simple_evaluate

    # lm-eval's @positional_deprecated decorator hides simple_evaluate's keyword signature from type checkers
    evaluate: Callable[..., Any] = simple_evaluate
    return evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager(tasks, include_paths),
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def task_metrics(results: dict) -> dict:
    """{task: {metric: value}} without lm-eval's bookkeeping entries (aliases, stderr placeholders)."""
    out = {}
    for task, values in results["results"].items():
        out[task] = {
            k.split(",")[0]: v
            for k, v in values.items()
            if k not in ("alias", "sample_len") and "_stderr" not in k and isinstance(v, (int, float))
        }
    return out
