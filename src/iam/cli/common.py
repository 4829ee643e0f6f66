"""What every command shares: argument types and groups, turning flags into the library's plain values, the checked
loader, report writing, and the errors' wording."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TypeVar

import torch

from ..core.cache import SLM_CACHES
from ..core.config import MappingConfig
from ..core.errors import ConfigError
from ..core.eviction import POLICIES, SCOPES, EvictionPolicy, make_policy, parse_budget
from ..core.model import load_checked
from ..core.selection import STRATEGIES, Unit, parse_unit
from ..core.similarity import METRICS
from ..eval import data
from ..eval.setup import Setup, arranged, checked_configs, parse_setups
from ..eval.windows import text_windows
from ..io import check_writable
from ..models.loading import user_calibrations
from ..models.placement import Placement
from ..reporting import write_report

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """argparse, its errors in the one-line form of every other user error (no usage block), with a hint to
    ``--help``; its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"iam: error: {message} (see '{self.prog} --help')\n")


# ---- argument types --------------------------------------------------------------------------------------------------
def layer_list(text: str) -> list[Unit]:
    try:
        return [parse_unit(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes comma-separated layers or layer:kv_group units, e.g. 20,21,22:1; got {text!r}"
        ) from None


def name_list(names: Sequence[str], distinct: bool = False) -> Callable[[str], list[str]]:
    """An argument type: comma-separated names out of ``names`` (with ``distinct``, each at most once; else repeats
    are dropped)."""

    def parse(text: str) -> list[str]:
        given = [x.strip() for x in text.split(",") if x.strip()]
        tasks = given if distinct else list(dict.fromkeys(given))
        if not tasks or set(tasks) - set(names) or len(set(tasks)) < len(tasks):
            kind = "distinct comma-separated" if distinct else "comma-separated"
            raise argparse.ArgumentTypeError(f"--tasks takes {kind} tasks of {','.join(names)}; got {text!r}")
        return tasks

    return parse


def number(text: str, kind: type, ok: Callable[[float], bool], what: str):
    """``text`` as a ``kind`` that satisfies ``ok``, else an argparse error saying it takes ``what``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"takes {what}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    return number(text, int, lambda v: v >= 1, "a whole number of at least 1")


def positive_float(text: str) -> float:
    return number(text, float, lambda v: 0 < v < float("inf"), "a number above 0")


def count_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes comma-separated whole numbers of at least 1, e.g. 512,8192; got {text!r}")
    return values


def ratio_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers, e.g. 0,0.3,0.5; got {text!r}")
    return values


def memory_map(text: str) -> dict:
    """``--max-memory``: ``0=70GiB,1=70GiB,cpu=200GiB`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        device, _, size = part.partition("=")
        if not device or not size:
            raise argparse.ArgumentTypeError(f"--max-memory takes device=size pairs, e.g. 0=70GiB,cpu=200GiB; got {text!r}")
        out[int(device) if device.isdigit() else device] = size
    return out


# ---- argument groups -------------------------------------------------------------------------------------------------
ROOT_DEFAULTS = {
    "out": None,
    "to": None,
    "json": None,
    "tp": None,
    "device_map": None,
    "max_memory": None,
    "offload_folder": None,
    "eviction": None,
    "budget": None,
    "eviction_scope": "all",
}
"""The values of a command without output, placement or eviction flags: the root parser's defaults, so every
command's arguments carry them."""


def add_pair_args(
    p: argparse.ArgumentParser, llm: str | None = "qwen2.5-coder-1.5b", slm: str | None = "qwen2.5-coder-0.5b"
) -> None:
    p.add_argument("--llm", default=llm, help="alias, .gguf file or transformers folder of the large model")
    p.add_argument("--slm", default=slm, help="alias, .gguf file or transformers folder of the small model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="pair an SLM tuned through another LLM (iam tune) anyway")


def add_eviction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eviction", default=None, choices=sorted(POLICIES), help="token eviction policy (with IAM or alone)")
    p.add_argument(
        "--budget", type=parse_budget, default=None, help="tokens kept per sequence: a fraction (0.8) or a count (256)"
    )
    p.add_argument(
        "--eviction-scope",
        default="all",
        choices=SCOPES,
        help="evict from every layer of both models, or only from the LLM's layers that keep K and V (unmapped)",
    )


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """Spreading the LLM over devices (``iam.models.placement``); ``--device`` is then unused."""
    p.add_argument(
        "--tp",
        nargs="?",
        const=0,
        type=positive_int,
        default=None,
        metavar="N",
        help="tensor parallelism over the torchrun processes (torchrun --nproc-per-node N -m iam ... --tp); "
        "bench --analytic --tp N: the memory per device",
    )
    p.add_argument(
        "--device-map", default=None, help="accelerate dispatch of the LLM: auto, balanced, sequential, or a JSON file of one"
    )
    p.add_argument("--max-memory", type=memory_map, default=None, help="with --device-map: e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where weights placed on 'disk' go")


def add_mapping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="auto", choices=sorted(STRATEGIES))
    p.add_argument("--metric", default="cosine", choices=sorted(METRICS))
    p.add_argument(
        "--blend",
        type=int,
        default=None,
        help="SLM heads mixed per mapped LLM head (1: the paper's best match; default: the value stored with the pair's "
        "calibration under --strategy auto/calibrated, else 1)",
    )
    p.add_argument(
        "--layers",
        type=layer_list,
        default=None,
        help="explicit LLM layers, or layer:kv_group for one KV group of a layer, e.g. 20,21,22:1 (overrides ratio)",
    )
    p.add_argument("--establish-threshold", type=int, default=20)
    p.add_argument("--truncation-threshold", type=int, default=100)
    p.add_argument("--slm-cache", default="native", choices=SLM_CACHES, help="SLM cache precision")
    p.add_argument("--llm-cache", default="native", choices=SLM_CACHES, help="LLM cache precision (K and V, or V where mapped)")
    p.add_argument(
        "--calibration", default=None, metavar="FILE", help="order for --strategy auto/calibrated, instead of the stored one"
    )
    p.add_argument(
        "--local-window",
        type=int,
        default=0,
        help="mapped heads attend exactly to the sinks and this many latest tokens; the SLM row covers older ones (0: off)",
    )
    p.add_argument("--local-sinks", type=int, default=None, help="first tokens attended exactly with --local-window (4)")


def add_head_mapping_arg(p: argparse.ArgumentParser) -> None:
    """``--head-mapping``: for commands that run one mapping (a label's ratio 0 would not be the LLM alone with it)."""
    p.add_argument(
        "--head-mapping",
        default=None,
        metavar="FILE",
        help="a fixed head mapping (iam export-vllm writes one): every sequence borrows its heads from the first token",
    )


def add_granularity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--granularity",
        choices=["layer", "kv-group"],
        default="layer",
        help="map whole layers, or each KV group (its query heads and K) of a layer on its own",
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results", help="folder for the JSON, Markdown and PNG files")
    p.add_argument("--json", action="store_true", help="print the JSON result")


def add_text_args(p: argparse.ArgumentParser, windows: int = 3, tokens: int = 512) -> None:
    p.add_argument(
        "--dataset",
        default="wikipedia",
        help="wikipedia, lee-news, python-docs, python-stdlib, python-stdlib-calib (offline), wikitext2, govreport (online); "
        "comma-separate to mix",
    )
    p.add_argument("--text", default=None, metavar="FILE", help="any text file instead of --dataset")
    p.add_argument("--windows", type=positive_int, default=windows)
    p.add_argument("--tokens", type=positive_int, default=tokens)


# ---- flags to values ---------------------------------------------------------------------------------------------
def from_flags(cls: type[T], args: argparse.Namespace, **given: object) -> T:
    """The dataclass ``cls`` from the flags named as its fields (``given``: fields set otherwise; the others keep
    their defaults)."""
    flags = vars(args)
    return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags and f.name not in given}, **given)


def mapping_config(args: argparse.Namespace, ratio: float) -> MappingConfig:
    return from_flags(MappingConfig, args, ratio=ratio, calibrations=user_calibrations())


def setups_of(
    args: argparse.Namespace, given: str | Sequence[Setup], **labelled
) -> tuple[MappingConfig, list[Setup], list[MappingConfig]]:
    """The base config, the configurations ``given`` (the text of ``--configs``, or ``Setup``s the command built from
    its flags) and their checked ``MappingConfig``s, before any weights load. The one rule of every command that takes
    configurations: a mapping flag that a configuration sets (``--local-window``, ``--llm-cache``, ``--layers``) is
    refused beside them (``eval.setup.configured``), the others apply to every configuration, ``--local-sinks`` to
    those with a window. ``labelled``: flags the command has put into its ``Setup``s itself, left out of the base."""
    setups = parse_setups(given, args.local_sinks) if isinstance(given, str) else arranged(given, args.local_sinks)
    base = from_flags(MappingConfig, args, ratio=0.0, local_sinks=None, calibrations=user_calibrations(), **labelled)
    return base, setups, checked_configs(base, setups)


def at_ratios(base: MappingConfig, ratios: Sequence[float]) -> list[MappingConfig]:
    return [replace(base, ratio=r) for r in ratios]


def eviction(args: argparse.Namespace) -> EvictionPolicy | None:
    return make_policy(args.eviction, args.budget, args.eviction_scope)


def placement(args: argparse.Namespace) -> Placement:
    """The ``Placement`` the command line asks for (all ``None`` where it has no placement flags)."""
    if args.tp and args.tp != int(os.environ.get("WORLD_SIZE", "1")):
        raise ValueError(f"--tp {args.tp} differs from the {os.environ.get('WORLD_SIZE', 1)} processes torchrun started.")
    device_map = args.device_map
    if device_map is not None and device_map.endswith(".json"):
        device_map = json.loads(Path(device_map).read_text())
    return Placement(
        tp_plan=None if args.tp is None else "auto",
        device_map=device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
    )


def load(args: argparse.Namespace, configs: Sequence[MappingConfig] = (), pair: tuple[str, str] | None = None):
    """``(llm, slm, tokenizer)`` of ``--llm``/``--slm`` (or ``pair``, where the command has its own defaults) through
    the library's checked loader (``load_checked``), with the command's eviction policy and placement; placed,
    ``--device`` is unused."""
    placed = placement(args)
    device = "cpu" if placed.placed else args.device
    llm, slm = pair or (args.llm, args.slm)
    dtype = getattr(torch, args.dtype)
    return load_checked(llm, slm, configs, eviction(args), dtype=dtype, device=device, force=args.force, placement=placed)


def named_windows(args: argparse.Namespace, tok, cut=text_windows) -> list[tuple[str, torch.Tensor]]:
    """``--windows`` windows of ``--tokens`` tokens from each of the comma-separated ``--dataset`` names (or from
    ``--text``), each with its text's name; ``cut`` makes them (token ids, or with ``window_texts`` the text)."""
    names = [args.text] if args.text else args.dataset.split(",")
    return [(name, w) for name in names for w in cut(tok, data.load_text(name), args.windows, args.tokens)]


def eval_windows(args: argparse.Namespace, tok) -> list[torch.Tensor]:
    """The windows of ``named_windows``, without names."""
    return [w for _, w in named_windows(args, tok)]


# ---- results and errors --------------------------------------------------------------------------------------------
def secondary_rank() -> bool:
    """Whether this is a torchrun process other than rank 0 (which alone prints and writes reports)."""
    return int(os.environ.get("RANK", "0")) != 0


def finish(args: argparse.Namespace, name: str, result: dict, columns: Sequence[str], plot=None) -> int:
    result.update(command=name, llm=args.llm, slm=args.slm, provenance=args.provenance)
    if secondary_rank():
        return 0
    paths = write_report(args.out, name, result, columns, plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(open(paths["markdown"]).read())
        print("wrote " + ", ".join(paths.values()))
    return 0


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: every folder a command will write into (``--out``, ``--to``) and the file of ``--json FILE``
    must be writable (``io.check_writable``); else ``ValueError`` naming it."""
    for flag, folder in [("--out", args.out), ("--to", args.to)]:
        if folder is not None:
            check_writable(folder, flag)
    if isinstance(args.json, str):
        check_writable(args.json, "--json", file=True)


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's parameter name (its ``dest``) and its long flag, over ``parser`` and its subcommands."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags = option_flags(sub) | flags
        elif action.option_strings:
            flags.setdefault(action.dest, max(action.option_strings, key=len))
    return flags


def as_flags(error: Exception, parser: argparse.ArgumentParser) -> str:
    """A library error in the command line's words. A ``ConfigError`` names its parameter by its flag (its ``param``
    field: ``ratio`` -> --ratio; a parameter without a flag keeps its name). Messages that name parameters in backticks
    instead (outside ``iam.core``) have each one replaced by its flag (`min_tokens` -> --min-tokens), any other name
    just losing the backticks."""
    flags = option_flags(parser)
    if isinstance(error, ConfigError):
        return error.naming(flags.get(error.param, error.param))
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), str(error))
