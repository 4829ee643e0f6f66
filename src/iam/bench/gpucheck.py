"""``make gpu-check``: one script for the day a GPU is lent, printing one JSON summary.

On one GPU (the shipped pair in bf16): the identity twin (the LLM mapped onto itself, every layer) equals the LLM
alone, IAM at ratio 0 generates what ``llm.generate`` does, and TTFT/TPOT and peak memory of the LLM alone against
IAM 0.3/0.5, plain and with the exact local window, at 512 and 4096 tokens. With two GPUs or more, IAM 0.5 also runs
tensor parallel over two (a ``torchrun`` child of this script) and dispatched over two by a ``device_map``.

``--device cpu`` with a tiny pair runs the same code on a CPU (what the tests do); the multi-GPU part needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.config import MappingConfig
from ..core.kernels import Kernels
from ..core.model import IAMForCausalLM
from ..eval.setup import Setup, build
from ..io import check_writable, write_atomic
from ..models.loading import load_pair
from ..models.placement import check_device
from .measure import random_prompt, run_generate
from .memory import PeakMemory

SETTINGS = (Setup(), Setup(0.3), Setup(0.5), Setup(0.3, 64), Setup(0.5, 64))
"""Timed settings: the LLM alone, and IAM at 0.3 and 0.5, plain and with the exact local window."""

HALF = Setup(0.5)
"""The setting of the multi-GPU checks."""


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes comma-separated whole numbers >= 1, e.g. 512,4096; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m iam.bench.gpucheck", description=__doc__)
    p.add_argument("--llm", default="qwen2.5-coder-1.5b")
    p.add_argument("--slm", default="qwen2.5-coder-0.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int_list, default=[512, 4096], help="prompt lengths timed")
    p.add_argument("--new-tokens", type=int_list, default=[32], help="tokens generated per timed run (one number)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary here")
    p.add_argument("--part", choices=["tp"], default=None, help=argparse.SUPPRESS)  # the torchrun child
    return p


def same_tokens(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))


def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)


@torch.inference_mode()
def correctness(llm, slm, ids: torch.Tensor, new_tokens: int) -> dict:
    """The identity twin against the LLM alone (logits and greedy tokens), IAM at ratio 0 against ``llm.generate``."""
    twin = IAMForCausalLM.from_pair(llm, llm, MappingConfig(ratio=1.0, strategy="back", blend=1))
    alone = llm(input_ids=ids).logits
    mapped = twin(input_ids=ids).logits
    reference = greedy(llm, ids, new_tokens)
    twin_diff = (mapped.float() - alone.float()).abs().max().item()
    checks = {
        "identity_twin": {
            "max_abs_logit_diff": twin_diff,
            "logit_scale": alone.float().abs().max().item(),
            "same_tokens": same_tokens(greedy(twin, ids, new_tokens), reference),
        },
        "ratio0_equals_generate": {
            "same_tokens": same_tokens(
                greedy(IAMForCausalLM.from_pair(llm, slm, MappingConfig(ratio=0.0)), ids, new_tokens), reference
            )
        },
    }
    checks["identity_twin"]["ok"] = checks["identity_twin"]["same_tokens"]
    checks["ratio0_equals_generate"]["ok"] = checks["ratio0_equals_generate"]["same_tokens"]
    return checks


def timings(
    llm, slm, tokens: list[int], new_tokens: int, settings: Sequence[Setup] = SETTINGS, kernels: Kernels = Kernels()
) -> list[dict]:
    """TTFT, TPOT and peak memory of each setting (the first: the LLM alone) at each prompt length (one warm-up run,
    then one timed); IAM's settings run on ``kernels``."""
    rows = []
    for n in tokens:
        ids = random_prompt(llm, 1, n, torch.Generator().manual_seed(n))
        for setting in settings:
            model = llm if setting.plain else build(llm, slm, MappingConfig(), setting, kernels=kernels)
            run_generate(model, ids, 2)  # warm-up: compiles FlexAttention, settles the allocator
            memory = PeakMemory(ids.device)
            with memory:
                timing, cache = run_generate(model, ids, new_tokens)
            kv, used = (None, None) if setting.plain else (cache.kv_bytes()["total"], kernels.summary())
            row = {"setting": setting.label, "tokens": n, "kernels": used, **timing, "peak_bytes": memory.bytes}
            rows.append({**row, "kv_bytes": kv})
    for row in rows:
        base = next(r for r in rows if r["tokens"] == row["tokens"] and r["setting"] == settings[0].label)
        row["ttft_ratio"], row["tpot_ratio"] = row["ttft_s"] / base["ttft_s"], row["tpot_s"] / base["tpot_s"]
    return rows


def two_device_map(llm_config) -> dict[str, int]:
    """The first half of the decoder layers (and the embeddings) on GPU 0, the rest, the norm and the LM head on GPU 1."""
    half = llm_config.num_hidden_layers // 2
    layers = {f"model.layers.{i}": 0 if i < half else 1 for i in range(llm_config.num_hidden_layers)}
    return {"model.embed_tokens": 0, "model.rotary_emb": 0, **layers, "model.norm": 1, "lm_head": 1}


def multi_gpu(args: argparse.Namespace, reference: dict[str, list[int]]) -> dict:
    """IAM 0.5 tensor parallel over two GPUs (a torchrun child) and dispatched over two; each against the one-GPU
    greedy tokens ``reference`` (per setting)."""
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): the multi-GPU checks need 2"}
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "tp.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "iam.bench.gpucheck",
        ]
        command += ["--part", "tp", "--llm", args.llm, "--slm", args.slm, "--dtype", args.dtype, "--json", str(part)]
        command += ["--tokens", str(args.tokens[0]), "--new-tokens", str(args.new_tokens[0])]
        run = subprocess.run(command, capture_output=True, text=True, timeout=240)
        out["tp2"] = json.loads(part.read_text()) if run.returncode == 0 else {"error": run.stderr[-2000:]}
    dtype = getattr(torch, args.dtype)
    try:
        from ..models.loading import read_configs

        llm_config, _ = read_configs(args.llm, args.slm)
        model = IAMForCausalLM.from_pretrained(
            args.llm, args.slm, dtype=dtype, device_map=two_device_map(llm_config), ratio=HALF.ratio
        )
        out["device_map2"] = timings(model.llm, model.slm, args.tokens[:1], args.new_tokens[0], [HALF])[0]
        ids = random_prompt(model.llm, 1, args.tokens[0], torch.Generator().manual_seed(args.tokens[0]))
        tokens = greedy(model, ids, args.new_tokens[0])[0].tolist()
        out["device_map2"]["same_tokens_as_one_gpu"] = tokens == reference[HALF.label]
    except Exception as e:  # reported in the summary: this is a check
        out["device_map2"] = {"error": f"{type(e).__name__}: {e}"}
    if "generated" in out["tp2"]:
        out["tp2"]["same_tokens_as_one_gpu"] = out["tp2"].pop("generated") == reference[HALF.label]
    return out


def tp_part(args: argparse.Namespace) -> None:
    """The torchrun child: IAM 0.5 with the LLM tensor parallel over the processes; rank 0 writes its part."""
    model = IAMForCausalLM.from_pretrained(args.llm, args.slm, dtype=getattr(torch, args.dtype), tp_plan="auto", ratio=HALF.ratio)
    row = timings(model.llm, model.slm, args.tokens[:1], args.new_tokens[0], [HALF])[0]
    ids = random_prompt(model.llm, 1, args.tokens[0], torch.Generator().manual_seed(args.tokens[0]))
    row["generated"] = greedy(model, ids, args.new_tokens[0])[0].tolist()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.json).write_text(json.dumps(row))


def summary(args: argparse.Namespace) -> dict:
    """Every check of the module docstring, as one JSON-ready dict whose ``ok`` says whether the checks passed."""
    start = time.perf_counter()
    device = check_device(args.device)
    llm, slm, _ = load_pair(args.llm, args.slm, dtype=getattr(torch, args.dtype), device=device, progress=False)
    new_tokens = args.new_tokens[0]
    ids = random_prompt(llm, 1, args.tokens[0], torch.Generator().manual_seed(args.tokens[0]))
    checks = correctness(llm, slm, ids, new_tokens)
    reference = {HALF.label: greedy(build(llm, slm, MappingConfig(), HALF), ids, new_tokens)[0].tolist()}
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpus": torch.cuda.device_count(),
        "dtype": args.dtype,
        "llm": args.llm,
        "slm": args.slm,
        "checks": checks,
        "timings": timings(llm, slm, args.tokens, new_tokens),
    }
    del llm, slm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["multi_gpu"] = multi_gpu(args, reference) if device.type == "cuda" else {"skipped": "not on CUDA"}
    result["ok"] = all(c["ok"] for c in checks.values()) and not any(
        "error" in v for v in result["multi_gpu"].values() if isinstance(v, dict)
    )
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.part == "tp":
        tp_part(args)
        return 0
    try:
        if args.json:
            check_writable(args.json, "--json", file=True)
        result = summary(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.json), text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
