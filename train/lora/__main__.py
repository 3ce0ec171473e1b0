"""LoRA command line.

python -m latentforge.train.lora merge runs/lora_tiny out/merged-hf                 # a LoRA run (its newest checkpoint)
python -m latentforge.train.lora merge BASE out/merged-hf --adapter path/to/adapter  # base (HF dir or DCP) + PEFT adapter
python -m latentforge.train.lora save-adapter runs/lora_tiny out/adapter              # the PEFT directory of a LoRA run
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from latentforge.model.hf import DTYPES


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m latentforge.train.lora", description="merge or extract LoRA adapters"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="fold adapters into the base and write a Hugging Face checkpoint")
    merge.add_argument("source", help="a LoRA run directory / DCP checkpoint, or a base (HF dir or DCP) with --adapter")
    merge.add_argument("out_dir")
    merge.add_argument("--adapter", default=None, help="a PEFT adapter directory to apply to the base")
    merge.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    extract = sub.add_parser("save-adapter", help="write the PEFT adapter directory of a LoRA run's checkpoint")
    extract.add_argument("source", help="a LoRA run directory or DCP checkpoint")
    extract.add_argument("out_dir")
    args = parser.parse_args(argv)

    from .checkpoint import export_merged, load_model, resolve_source
    from .peft_format import save_adapter

    if args.command == "merge":
        out = export_merged(args.source, args.out_dir, adapter=args.adapter, dtype=DTYPES[args.dtype])
        print(f"merged {args.source}{' + ' + args.adapter if args.adapter else ''} -> {out}")
    else:
        model, cfg = load_model(args.source)
        if cfg is None:
            parser.error(f"{args.source} holds no adapters (no lora_config.json in the checkpoint)")
        save_adapter(model, args.out_dir, cfg, base_model_name_or_path=resolve_source(args.source)[1])
        print(f"adapter of {args.source} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
