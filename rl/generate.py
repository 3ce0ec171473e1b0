"""Generate a completion from a checkpoint: `python -m latentforge.rl.generate ckpt=<dir> prompt="..."`.

    python -m latentforge.rl.generate ckpt=out/tiny-hf prompt="What is 3 + 4 * 5?"
    python -m latentforge.rl.generate ckpt=runs/tiny prompt="Once upon a time" chat=false max_new_tokens=64 temperature=0.7
    python -m latentforge.rl.generate ckpt=out/tiny-hf prompt="..." think=false draft_tokens=3 stats=true

ckpt: a Hugging Face directory (config.json + safetensors, e.g. from `python -m latentforge.train.export`) or a DCP
checkpoint / run directory written by the trainer. The tokenizer is the checkpoint's own `tokenizer.json`
(or `tokenizer=<spec>`, e.g. bpe:4096). With chat=true (default) the prompt is a user turn in the ChatML template
with reasoning on (think=true) or off, and generation stops at <|im_end|>; with chat=false the prompt text
follows a document separator, as a document does in pretraining, and generation stops at </s>. Arguments follow
Hydra's override grammar: a prompt with brackets, commas or `=` is quoted for it, `'prompt="def fib(n):"'`.
Options (key=value): system="" think=true chat=true skip_special=false stats=false threads=<torch threads>
device=cpu|cuda dtype=float32; any SamplingParams field (max_new_tokens temperature top_p top_k seed
stop_token_ids) and any EngineConfig field (draft_tokens draft_gate prefix_cache_size ...), flat or as
sampling.<key> / engine.<key>, with those classes' defaults except greedy sampling, one slot and draft_tokens (the
checkpoint's MTP depth unless given); engine.max_seq_len is the prompt + max_new_tokens; `seed` is the request's.
"""

from __future__ import annotations

import json
import os
import sys
import time
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Optional

import torch

from latentforge.model.engine.config import EngineConfig, SamplingParams
from latentforge.model.errors import entry_point

TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def generate_sampling() -> SamplingParams:
    """Greedy: a command line asks for the model's completion, the same one every run."""
    return SamplingParams(temperature=0.0)


def generate_engine() -> EngineConfig:
    """One prompt, one slot; draft_tokens left out of the command line means the checkpoint's MTP depth."""
    return EngineConfig(max_batch=1)


@dataclass
class GenerateArgs:
    ckpt: str = ""
    prompt: str = ""
    system: str = ""
    chat: bool = True
    think: bool = True
    # before `engine`: a flat key both hold (seed) is the request's
    sampling: SamplingParams = field(default_factory=generate_sampling)
    engine: EngineConfig = field(default_factory=generate_engine)
    tokenizer: str = ""
    skip_special: bool = False
    stats: bool = False
    threads: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def read_key_values(argv, cls) -> dict:
    """`key=value` arguments (Hydra's override grammar, as every LatentForge command takes them) as a mapping of
    `cls`'s fields: a flat key naming a field of one of `cls`'s nested dataclass fields (`temperature` for
    `sampling.temperature`; the first such field where two hold it) goes into that field's mapping, as does a dotted
    `sampling.temperature`. Unknown keys are one line listing the valid ones."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    top = [f.name for f in fields(cls)]  # in declaration order: it decides which nested field gets a shared key
    hints = typing.get_type_hints(cls)  # the field types (this module's annotations are strings)
    nested = {name: [f.name for f in fields(hints[name])] for name in top if _is_dataclass_type(hints[name])}
    options = list(dict.fromkeys([name for name in top if name not in nested] + sum(nested.values(), [])))
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"argument {arg!r}: expected key=value (keys: {', '.join(options)})")
    try:
        overrides = OverridesParser.create().parse_overrides([a.lstrip("-") for a in argv])
    except HydraException as e:
        raise SystemExit(f"could not parse the arguments: {e}") from None
    values: dict[str, Any] = {}
    unknown = []
    for override in overrides:
        key, value = override.key_or_group.replace("-", "_"), override.value()
        group, _, sub = key.rpartition(".")
        owner = group if group in nested and sub in nested[group] else None
        owner = owner or next((name for name, keys in nested.items() if key in keys and key not in top), None)
        if owner:
            values.setdefault(owner, {})[sub] = value
        elif key in top and key not in nested:
            values[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; options: {', '.join(options)}")
    return values


def parse_key_values(argv, cls):
    """`key=value` arguments into the dataclass `cls` (read_key_values, then args_from)."""
    return args_from(read_key_values(argv, cls), cls)


def args_from(values: dict, cls):
    """read_key_values' mapping as `cls`, checked by the same typed `from_dict` as the recipes: a bad value is one
    line naming its key; the keys a nested field is not given keep `cls`'s default for that field."""
    from latentforge.model.schema import SchemaError, from_dict

    try:
        return from_dict(cls, values, "", SchemaError)
    except SchemaError as e:
        raise SystemExit(str(e)) from None


def _is_dataclass_type(kind) -> bool:
    return isinstance(kind, type) and is_dataclass(kind)


def load_model(ckpt: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """HybridModel from a Hugging Face directory or a trainer's DCP checkpoint (or run directory)."""
    if not ckpt:
        raise SystemExit("ckpt=<dir> is required: a Hugging Face directory or a DCP checkpoint / run directory")
    if not os.path.exists(ckpt):
        raise SystemExit(f"ckpt={ckpt}: no such directory")
    if os.path.isfile(os.path.join(ckpt, "config.json")):
        from latentforge.model.hf import load_pretrained

        model = load_pretrained(ckpt, dtype=dtype, device=device)
    else:
        try:
            from latentforge.train.export import load_model_from_checkpoint, resolve_checkpoint
        except ImportError as error:
            raise SystemExit(
                f"ckpt={ckpt} is not a Hugging Face directory (no config.json) and the DCP loader "
                f"(train.export) is unavailable: {error}"
            ) from None
        try:
            path = resolve_checkpoint(ckpt)
        except FileNotFoundError as error:
            raise SystemExit(
                f"ckpt={ckpt} is neither a Hugging Face directory (no config.json) nor a DCP checkpoint: {error}"
            ) from None
        model = load_model_from_checkpoint(path).to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def find_tokenizer_file(ckpt: str) -> Optional[str]:
    """The checkpoint's recorded tokenizer: tokenizer.json in it (HF export, DCP step dir) or its newest step."""
    candidates = [os.path.join(ckpt, TOKENIZER_FILE)]
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        try:
            from latentforge.train.export import resolve_checkpoint

            candidates.append(os.path.join(resolve_checkpoint(ckpt), TOKENIZER_FILE))
        except (ImportError, FileNotFoundError):
            pass
    return next((c for c in candidates if os.path.isfile(c)), None)


def load_tokenizer_for(ckpt: str, spec: str = ""):
    from latentforge.data.tokenizer import load_tokenizer

    if spec:
        return load_tokenizer(spec)
    path = find_tokenizer_file(ckpt)
    if path is None:
        raise SystemExit(
            f"no {TOKENIZER_FILE} in {ckpt}: pass tokenizer=<spec> (e.g. tokenizer=bpe:4096, "
            "tokenizer=tekken or tokenizer=/path/tokenizer.json)"
        )
    return load_tokenizer(path)


def prompt_ids(tokenizer, text: str, chat: bool, think: bool, system: str = "") -> list:
    if not chat:
        return [tokenizer.eod_id] + tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, enable_thinking=think, add_generation_prompt=True)


@entry_point("latentforge-generate")
def main(argv=None) -> int:
    values = read_key_values(sys.argv[1:] if argv is None else argv, GenerateArgs)
    args = args_from(values, GenerateArgs)
    draft_given = "draft_tokens" in values.get("engine", {})  # else the checkpoint's MTP depth
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype not in DTYPES:
        raise SystemExit(f"dtype={args.dtype!r}: use one of {', '.join(DTYPES)}")
    from latentforge.model.engine import Engine

    model = load_model(args.ckpt, args.device, DTYPES[args.dtype])
    tokenizer = load_tokenizer_for(args.ckpt, args.tokenizer)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise SystemExit(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.cfg.vocab_size}: "
            "pass the tokenizer the checkpoint was trained with"
        )
    ids = prompt_ids(tokenizer, args.prompt, args.chat, args.think, args.system)
    draft = args.engine.draft_tokens if draft_given else model.cfg.mtp_depths
    stop = (tokenizer.im_end_id, tokenizer.eod_id) if args.chat else (tokenizer.eod_id,)
    params = replace(args.sampling, stop_token_ids=(*args.sampling.stop_token_ids, *stop))
    engine_cfg = replace(args.engine, max_seq_len=len(ids) + params.max_new_tokens, draft_tokens=draft)
    engine = Engine(model, engine_cfg)
    start = time.perf_counter()
    (result,) = engine.generate([ids], params)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(result.token_ids, skip_special_tokens=args.skip_special))
    if args.stats:
        s = engine.stats
        line = {
            "prompt_tokens": len(ids),
            "new_tokens": len(result.token_ids),
            "finish": result.finish_reason,
            "seconds": round(elapsed, 3),
            "tokens_per_s": round(len(result.token_ids) / elapsed, 2),
            "draft_tokens": draft,
        }
        if draft:
            line.update(
                mean_accepted_length=round(s.mean_accepted_length, 3),
                acceptance=[round(a, 3) for a in s.acceptance_rate],
            )
        print(json.dumps(line), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
