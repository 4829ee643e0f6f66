"""The ``iam`` command line: ``generate``, ``demo``, ``eval ...``, ``similarity``, ``calibrate``, ``export-vllm``,
``bench`` and ``tune``. Each command parses, checks its mapping configs against the pair's configs, loads, and hands
over to the library.

Exit codes: 0 done; 2 a user error (``USER_ERRORS``: one line ``iam: error: ...``, as argparse's own errors exit);
130 interrupted (Ctrl-C or SIGTERM while a model is being converted); 1 an internal error (its traceback, then a
one-line request to report it)."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import traceback
from collections.abc import Callable, Sequence

from ..reporting import provenance
from .bench import add_bench_parser
from .calibrate import calibrate_arguments, cmd_calibrate, cmd_similarity, similarity_arguments
from .common import ROOT_DEFAULTS, Parser, as_flags, check_outputs, secondary_rank
from .evaluate import add_eval_parsers
from .export import cmd_export, export_arguments
from .generate import cmd_demo, cmd_generate, demo_arguments, generate_arguments
from .tune import cmd_tune, tune_arguments

# What a user can act on: the library raises ValueError for every bad input or setting, FileNotFoundError for a
# missing file, package or model. Anything else escaping a command is a bug in iam-llm.
USER_ERRORS = (ValueError, FileNotFoundError)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("generate text with IAM", generate_arguments, cmd_generate),
    "demo": ("the shipped pair: LLM alone vs IAM side by side", demo_arguments, cmd_demo),
    "similarity": (
        "per LLM layer mean best-match similarity, and an LLM x SLM layer heatmap",
        similarity_arguments,
        cmd_similarity,
    ),
    "calibrate": (
        "measure which LLM layers cost least to map; store the order for --strategy auto",
        calibrate_arguments,
        cmd_calibrate,
    ),
    "tune": ("tune the SLM through the mapped LLM's loss (paper Appendix A)", tune_arguments, cmd_tune),
    "export-vllm": ("write an IAM folder that vLLM serves (the iam_vllm plugin)", export_arguments, cmd_export),
}
"""The commands beside ``bench`` and ``eval``: help, flags, handler (``iam.cli.evaluate`` holds the evaluations)."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="iam", description=__doc__)
    parser.set_defaults(**ROOT_DEFAULTS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "demo", "similarity", "calibrate", "export-vllm"):
        help_text, arguments, handler = COMMANDS[name]
        p = sub.add_parser(name, help=help_text)
        arguments(p)
        p.set_defaults(func=handler)
    add_bench_parser(sub)
    help_text, arguments, handler = COMMANDS["tune"]
    p = sub.add_parser("tune", help=help_text)
    arguments(p)
    p.set_defaults(func=handler)
    add_eval_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(provenance=provenance(argv))  # the code as it was when the command started, which is what it ran
    args = parser.parse_args(argv)
    try:
        check_outputs(args)
        if secondary_rank():  # under torchrun only rank 0 prints
            with contextlib.redirect_stdout(io.StringIO()):
                return args.func(args)
        return args.func(args)
    except USER_ERRORS as err:
        print(f"iam: error: {as_flags(err, parser)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iam: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("iam: internal error; please report it with the traceback above", file=sys.stderr)
        return 1
