"""``iam export-vllm``: an IAM folder for vLLM (``iam.export``)."""

from __future__ import annotations

import argparse
import json

from .. import export
from ..eval import data
from ..eval.windows import text_windows
from .common import add_head_mapping_arg, add_mapping_args, add_pair_args, add_text_args, mapping_config


def export_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_args(p)
    add_mapping_args(p)
    p.set_defaults(strategy="back", blend=1)
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the LLM's layers mapped")
    add_text_args(p, windows=4, tokens=128)
    add_head_mapping_arg(p)  # exported as it is, instead of one chosen over the calibration windows
    p.add_argument("--out", required=True, metavar="FOLDER", help="the IAM folder to write (replaced whole if it exists)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def cmd_export(args: argparse.Namespace) -> int:
    config = mapping_config(args, args.ratio)
    names = [args.text] if args.text else args.dataset.split(",")
    windows_of = lambda tok: [w for name in names for w in text_windows(tok, data.load_text(name), args.windows, args.tokens)]
    source = {"calibration": names, "windows": args.windows, "tokens": args.tokens, "provenance": args.provenance}
    result = export.export_vllm(args.llm, args.slm, args.out, config, windows_of, source)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['out']}: LLM layers {result['mapped_layers']} mapped, SLM run {result['slm_depth']} layers deep")
        print(f"serve it: vllm serve {result['out']}   (pip install 'iam-llm[vllm]')")
    return 0
