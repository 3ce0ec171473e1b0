"""`latentforge-eval`: lm-evaluation-harness tasks on a DCP checkpoint (any run directory) or a Hugging Face export.

    latentforge-eval runs/sft_tiny --tasks lf_arith,lf_choice,lf_text            # the local tasks, offline
    latentforge-eval out/tiny-hf --tasks hellaswag,arc_easy,gsm8k --batch-size 16  # standard tasks (needs the hub)
    lm_eval --model hf --model_args pretrained=out/tiny-hf --tasks ...               # the same numbers, stock hf

The registered lm-eval model `latentforge` (`LatentForgeLM`) scores log-likelihoods with the model's forward
(train/eval_harness.py) and generates with the inference engine (model/engine: greedy or sampled, stop at `</s>` /
`<|im_end|>` as the export's generation_config.json says, then lm-eval's `until` strings cut the text).
`--parallel` (under torchrun) evaluates a DCP checkpoint on a training layout: rl/parallel_evaluation.py. lm-eval's
own command line with this model registered: `latentforge-lm-eval` (rl/lm_eval_cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence, TypeVar

import torch

from latentforge.train.eval_harness import LogLikelihoodLM, model_scorer, run_tasks, task_metrics

STOP_TOKEN_IDS = (2, 11)  # </s>, <|im_end|>: data/hf_tokenizer.generation_config
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


ModelClass = TypeVar("ModelClass", bound=type)


def _register(cls: ModelClass) -> ModelClass:
    from lm_eval.api.registry import register_model

    register_model("latentforge")(cls)  # registers and returns cls itself
    return cls


@_register
class LatentForgeLM(LogLikelihoodLM):
    """lm-eval model: `--model latentforge --model_args checkpoint=PATH[,batch_size=8,device=cpu,dtype=float32,
    max_length=2048,tokenizer=SPEC,prefix_token_id=ID,max_batch=16]`."""

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        *,
        model=None,
        tokenizer=None,
        batch_size: int = 8,
        max_length: int = 2048,
        device: str = "cpu",
        dtype: str = "float32",
        prefix_token_id: Optional[int] = None,
        max_gen_toks: int = 256,
        max_batch: int = 16,
        enable_thinking: Optional[bool] = None,
        **unused,
    ):
        from latentforge.rl.generate import load_model

        if model is None:
            if checkpoint is None:
                raise ValueError("LatentForgeLM needs checkpoint=<DCP checkpoint, run directory or HF export>")
            model = load_model(checkpoint, device=device, dtype=DTYPES[dtype])
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = checkpoint_tokenizer(checkpoint, tokenizer or None)
        super().__init__(
            model_scorer(model, int(batch_size), device),
            tokenizer,
            batch_size=int(batch_size),
            max_length=int(max_length),
            device=device,
            prefix_token_id=None if prefix_token_id is None else int(prefix_token_id),
            max_gen_toks=int(max_gen_toks),
            enable_thinking=enable_thinking,
        )
        self.model = model.eval()
        self.max_batch = int(max_batch)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        from lm_eval.utils import simple_parse_args_string

        return cls(**{**simple_parse_args_string(arg_string), **_run_config(additional_config)})

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        """lm-eval's command line (`latentforge-lm-eval`) builds the model through here."""
        return cls(**{**arg_dict, **_run_config(additional_config)})

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        texts = generate_texts(self, self.model, self.max_batch, [request.args for request in requests])
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def _run_config(additional_config: Optional[dict]) -> dict:
    """What lm-eval passes besides model_args that this model takes: --batch_size (a number; "auto" is the
    default 8 here) and --device (lm-eval's default cuda:0 means the CPU where there is no CUDA, as its hf model)."""
    config = additional_config or {}
    out = {}
    device = config.get("device")
    if device is not None:
        out["device"] = "cpu" if str(device).startswith("cuda") and not torch.cuda.is_available() else device
    batch_size = config.get("batch_size")
    if batch_size is not None and str(batch_size).isdigit():
        out["batch_size"] = int(batch_size)
    return out


def generate_texts(
    lm: LogLikelihoodLM,
    model,
    max_batch: int,
    requests: Sequence[tuple],
    positions: Optional[Sequence[int]] = None,
) -> List[str]:
    """lm-eval's generate_until on the inference engine: (context, gen_kwargs) pairs -> the generated texts, cut at
    the stop tokens and lm-eval's `until` strings. Greedy unless do_sample; a sampled request is seeded by its
    position in lm-eval's request list (`positions`, default 0..n-1), so every tensor-parallel rank draws the same
    tokens and a data-parallel rank given a share of the requests draws what one device would."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    from latentforge.model.engine import Engine, EngineConfig, SamplingParams

    eos = lm.tok_decode([lm.eot_token_id], skip_special_tokens=False)
    prompts, params, untils = [], [], []
    positions = range(len(requests)) if positions is None else positions
    for position, (context, gen_kwargs) in zip(positions, requests):
        kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
        untils.append(handle_stop_sequences(kwargs.pop("until", None), eos=eos))
        new_tokens = kwargs.pop("max_gen_toks")
        prompts.append(lm.tok_encode(context)[-(lm.max_length - new_tokens) :])
        params.append(
            SamplingParams(
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                top_p=float(kwargs.get("top_p", 1.0)),
                top_k=int(kwargs.get("top_k", 0) or 0),
                max_new_tokens=new_tokens,
                stop_token_ids=STOP_TOKEN_IDS,
                seed=int(position),
            )
        )
    if not prompts:
        return []
    engine = Engine(model, EngineConfig(max_batch=max_batch, max_seq_len=lm.max_length + 1))
    texts = []
    for until, result in zip(untils, engine.generate(prompts, params)):
        tokens = [t for t in result.token_ids if t not in STOP_TOKEN_IDS]
        texts.append(postprocess_generated_text(lm.tok_decode(tokens), until, None))
    return texts


def parse_parallel(text: str) -> dict:
    """ "tp=2,pp=2" -> {"tp": 2, "pp": 2} (keys of the recipe's parallel group)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--parallel {text!r}: expected key=value pairs such as tp=2,dp_shard=4")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


def checkpoint_tokenizer(checkpoint: Optional[str], spec: Optional[str] = None):
    """The tokenizer of a Hugging Face export (its tokenizer.json) or DCP checkpoint (data/hf_tokenizer.py)."""
    from latentforge.data import hf_tokenizer
    from latentforge.data.tokenizer import HFTokenizer, load_tokenizer

    if spec:
        return load_tokenizer(spec)
    if checkpoint and os.path.isfile(os.path.join(checkpoint, hf_tokenizer.TOKENIZER_FILE)):
        return HFTokenizer(os.path.join(checkpoint, hf_tokenizer.TOKENIZER_FILE))
    from latentforge.model.hf import resolve_checkpoint

    found = hf_tokenizer.checkpoint_tokenizer(resolve_checkpoint(checkpoint)) if checkpoint else None
    if found is None:
        raise SystemExit(f"{checkpoint} records no tokenizer: pass --tokenizer (tekken, bpe:4096 or a tokenizer.json)")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="latentforge-eval", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("checkpoint", help="a DCP checkpoint or run directory (its newest), or a Hugging Face export")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    parser.add_argument("--include-path", action="append", default=[], help="a folder of extra task YAML files")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec when the checkpoint records none")
    parser.add_argument(
        "--prefix-token-id",
        type=int,
        default=None,
        help="the token before an empty context (default <s>, as lm-eval's hf model)",
    )
    parser.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    parser.add_argument(
        "--enable-thinking",
        choices=["true", "false"],
        default=None,
        help="the chat template's reasoning switch (default: the template's, on)",
    )
    parser.add_argument("--output", default=None, help="write the results (and samples) as JSON here")
    parser.add_argument("--log-samples", action="store_true")
    parser.add_argument(
        "--parallel",
        default=None,
        help="under torchrun: a layout of the recipe's parallel group, e.g. tp=2,pp=2 (a DCP checkpoint; "
        "--batch-size rows per micro-batch; generative tasks under tp and dp only)",
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        parser.error(
            f"{args.checkpoint}: no such directory (expected a DCP checkpoint, a run directory or a "
            "Hugging Face export)"
        )
    tasks = [t for t in args.tasks.split(",") if t]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer) if args.tokenizer else None
    if args.parallel is not None:
        from latentforge.rl.parallel_evaluation import generation_blocker, parallel_lm
        from latentforge.train.eval_harness import generating_tasks

        layout = parse_parallel(args.parallel)
        reason = generation_blocker(layout)
        generating = generating_tasks(tasks, args.include_path) if reason else []
        if generating:
            raise SystemExit(f"latentforge-eval: {', '.join(generating)}: {reason}")  # one line, exit status 1
        lm = parallel_lm(
            args.checkpoint,
            layout,
            tokenizer,
            micro_batch_size=args.batch_size,
            max_length=args.max_length,
            prefix_token_id=args.prefix_token_id,
        )
    else:
        lm = LatentForgeLM(
            args.checkpoint,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device=args.device,
            dtype=args.dtype,
            tokenizer=tokenizer,
            prefix_token_id=args.prefix_token_id,
            enable_thinking=None if args.enable_thinking is None else args.enable_thinking == "true",
        )
    results = run_tasks(
        lm,
        tasks,
        limit=limit,
        num_fewshot=args.num_fewshot,
        include_paths=args.include_path,
        log_samples=args.log_samples,
        apply_chat_template=args.apply_chat_template,
    )
    from lm_eval.utils import make_table

    from latentforge.train import distributed as world

    if world.rank() != 0:
        return 0
    print(make_table(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(
                {"metrics": task_metrics(results), "samples": results.get("samples", {})}, f, indent=1, default=str
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
