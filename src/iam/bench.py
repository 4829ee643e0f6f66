"""Efficiency benchmarks: analytic (configs only) and measured (real runs, side by side, medians).

Analytic accounting per ratio ``r`` (``n = round(r * L)`` mapped layers):

- KV bytes per token: ``2 L kv d b`` for the LLM alone; IAM drops the K of the ``n`` mapped layers and adds the
  SLM's whole cache (``paper`` accounting); the ``iam`` accounting keeps that SLM cache in int8 with one scale
  per head and token, as ``MappingConfig(slm_cache="int8")`` does.
- Prefill FLOPs (``T`` tokens): linear layers ``2 P T`` plus causal attention ``2 H d T^2`` per layer (QK^T and PV),
  LM head on the last token. A mapped layer skips its Q/K projections and QK^T, keeps V, O, MLP and PV, and its
  SDPA recomputes the SLM's QK^T per LLM head (``H d_s T^2``); the SLM runs its layers but not its LM head.
- Decode is memory-bound: a step reads the weights once and every sequence's KV, so the TPOT limit is the ratio
  of bytes read per step.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

import torch

from .attention import FLEX_MIN_TOKENS
from .config import with_baseline
from .memory import PeakMemory, TensorPeak
from .presets import Arch

GB = 1e9


@dataclass(frozen=True)
class Scenario:
    """Prompt length, batch and new tokens of a benchmark run."""

    prompt: int
    batch: int
    new_tokens: int


SCENARIOS = {
    # paper-size settings, then CPU-sized defaults
    "concurrency": (Scenario(512, 64, 512), Scenario(512, 4, 32)),
    "long": (Scenario(8192, 8, 512), Scenario(8192, 1, 32)),
}


METHODS = {
    "paper": "plain IAM: mapped layers drop K, the SLM's full cache is added",
    "iam": "this library: as paper, with the SLM cache in int8 plus one scale per head and token (slm_cache='int8')",
}


def kv_bytes_per_token(llm: Arch, slm: Arch, n_mapped: int, elem: int, method: str = "paper") -> int:
    base = 2 * llm.layers * llm.kv_heads * llm.head_dim * elem
    if n_mapped == 0:
        return base
    slm_row = slm.head_dim * elem if method == "paper" else slm.head_dim + elem
    return base - n_mapped * llm.kv_heads * llm.head_dim * elem + 2 * slm.layers * slm.kv_heads * slm_row


def layer_prefill_flops(llm: Arch, slm: Arch, tokens: int, mapped: bool = False) -> float:
    """FLOPs of one LLM decoder layer over ``tokens`` (causal attention: QK^T and PV each ``H d T^2``)."""
    t = tokens
    if not mapped:
        return 2 * llm.layer_params * t + 2 * llm.heads * llm.head_dim * t * t
    # No Q/K projections and no own QK^T; PV stays, and SDPA redoes the SLM head's QK^T per LLM head.
    return 2 * (llm.layer_params - llm.qk_params) * t + llm.heads * (llm.head_dim + slm.head_dim) * t * t


def prefill_flops(llm: Arch, slm: Arch, n_mapped: int, tokens: int) -> float:
    """Prefill FLOPs of the whole pair (LM head on the last token only; the SLM runs no LM head)."""
    total = (llm.layers - n_mapped) * layer_prefill_flops(llm, slm, tokens) + 2 * llm.hidden * llm.vocab
    if n_mapped:
        total += n_mapped * layer_prefill_flops(llm, slm, tokens, mapped=True) + slm.layers * layer_prefill_flops(
            slm, slm, tokens
        )
    return total


def decode_bytes(llm: Arch, slm: Arch, n_mapped: int, batch: int, context: int, elem: int, method: str = "paper") -> float:
    """Bytes read by one decode step: weights once (the SLM without its LM head), plus the KV of every sequence."""
    weights = (llm.params - (n_mapped * llm.qk_params)) * elem
    if n_mapped:
        weights += (slm.params - slm.vocab * slm.hidden * (0 if slm.tied else 1)) * elem
    return weights + batch * context * kv_bytes_per_token(llm, slm, n_mapped, elem, method)


def analytic_rows(
    llm: Arch, slm: Arch, ratios: list[float], scenario: Scenario, elem: int = 2, budget_gb: float | None = None
) -> list[dict]:
    """Rows per method (``paper``, ``iam``) and ratio; ratio 0 (the LLM alone) first."""
    context = scenario.prompt + scenario.new_tokens
    base_kv = kv_bytes_per_token(llm, slm, 0, elem)
    base_prefill = prefill_flops(llm, slm, 0, scenario.prompt)
    base_decode = decode_bytes(llm, slm, 0, scenario.batch, context, elem)
    base_batch = base_tput = None
    rows = []
    for method in METHODS:
        for r in with_baseline(ratios):
            n = round(r * llm.layers)
            kv = kv_bytes_per_token(llm, slm, n, elem, method)
            flops = prefill_flops(llm, slm, n, scenario.prompt)
            row = {
                "method": method,
                "ratio": r,
                "mapped_layers": n,
                "kv_bytes": kv,
                "kv_ratio": kv / base_kv,
                "prefill_tflops": flops / 1e12,
                "ttft_limit": base_prefill / flops,
                "tpot_limit": base_decode / decode_bytes(llm, slm, n, scenario.batch, context, elem, method),
            }
            if budget_gb is not None:
                weights = (llm.params + (slm.params if n else 0)) * elem
                max_batch = max(int((budget_gb * GB - weights) // (kv * context)), 0)
                step = decode_bytes(llm, slm, n, max_batch, context, elem, method)
                row["max_batch"] = max_batch
                row["throughput_tok_s_per_tbps"] = max_batch / step * 1e12 if max_batch else 0.0
                if base_batch is None:
                    base_batch, base_tput = max_batch, row["throughput_tok_s_per_tbps"]
                row["batch_ratio"] = max_batch / base_batch if base_batch else math.nan
                row["throughput_ratio"] = row["throughput_tok_s_per_tbps"] / base_tput if base_tput else math.nan
            rows.append(row)
    return rows


def break_even(llm: Arch, slm: Arch, elem: int = 2, method: str = "paper") -> float | None:
    """Smallest mapping ratio at which IAM's KV falls below the LLM alone; None if never."""
    for n in range(1, llm.layers + 1):
        if kv_bytes_per_token(llm, slm, n, elem, method) < kv_bytes_per_token(llm, slm, 0, elem):
            return n / llm.layers
    return None


# ---- measured ------------------------------------------------------------------------------------------------
def random_prompt(llm, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids (clear of the vocabulary's ends, where special tokens live) on the LLM's device."""
    vocab = llm.config.vocab_size
    margin = min(100, vocab // 4)
    return torch.randint(margin, vocab - margin, (batch, length), generator=generator).to(llm.device)


def measure(llm, slm, ratios: list[float], scenario: Scenario, repeats: int, base_config, progress: bool = True) -> list[dict]:
    """Run the LLM alone and IAM at each ratio, interleaved, ``repeats`` times; report medians."""
    from tqdm.auto import tqdm

    from .model import IAMModel

    device = llm.device
    ids = random_prompt(llm, scenario.batch, scenario.prompt, torch.Generator().manual_seed(0))
    ratios = with_baseline(ratios)
    samples: dict[float, list[dict]] = {r: [] for r in ratios}
    warm = ids[:, :FLEX_MIN_TOKENS]  # long enough to compile the mapped prefill's kernel before any timing
    IAMModel(llm, slm, replace(base_config, ratio=ratios[-1])).generate(warm, max_new_tokens=2)
    runs = [(rep, r) for rep in range(repeats) for r in ratios]
    for _, r in tqdm(runs, desc="bench runs", disable=not progress):
        iam = IAMModel(llm, slm, replace(base_config, ratio=r))
        with PeakMemory(device) as mem:
            iam.generate(ids, max_new_tokens=scenario.new_tokens, eos_token_id=[])
        t = iam.timings
        samples[r].append({**t, "peak_mem_bytes": mem.bytes, "kv": iam.kv_cache_bytes(), "layers": iam.mapped_units})
    rows = []
    base = samples[0.0][-1]["kv"]["total"]
    for r in ratios:
        s = samples[r]
        ttft = statistics.median(x["ttft_s"] for x in s)
        tpot = statistics.median(x["tpot_s"] for x in s)
        kv = s[-1]["kv"]
        rows.append(
            {
                "ratio": r,
                "mapped_layers": s[-1]["layers"],
                "kv_bytes": kv["total"],
                "kv_llm_bytes": kv["llm"],
                "kv_slm_bytes": kv["slm"],
                "kv_ratio": kv["total"] / base,
                "ttft_s": ttft,
                "tpot_s": tpot,
                "throughput_tok_s": scenario.batch / tpot,
                "peak_mem_bytes": statistics.median(x["peak_mem_bytes"] for x in s),
            }
        )
    for row in rows:
        row["ttft_speedup"] = rows[0]["ttft_s"] / row["ttft_s"]
        row["tpot_speedup"] = rows[0]["tpot_s"] / row["tpot_s"]
    return rows


def memory_scaling(llm, slm, lengths: list[int], ratios: list[float], base_config, progress: bool = True) -> list[dict]:
    """Prefill plus one decode step at each prompt length, the LLM alone and IAM at each ratio, under ``TensorPeak``.

    Returns one row per (length, ratio): ``peak_tensor_bytes`` (activations and caches, weights excluded),
    ``largest_tensor_bytes``, ``tt_matrix_bytes`` (what one head's ``T x T`` score matrix would take), ``kv_bytes``
    and ``peak_growth`` (peak over the previous length's peak; about the length growth when memory is linear,
    its square when it is quadratic).
    """
    from tqdm.auto import tqdm

    from .model import IAMModel

    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    runs = [(n, r) for n in sorted(lengths) for r in with_baseline(ratios)]
    for n, r in tqdm(runs, desc="memory scaling", disable=not progress):
        ids = random_prompt(llm, 1, n, g)
        iam = IAMModel(llm, slm, replace(base_config, ratio=r))
        with TensorPeak() as mem:
            iam.generate(ids, max_new_tokens=2, eos_token_id=[])
        previous = next((row for row in reversed(rows) if row["ratio"] == r), None)
        rows.append(
            {
                "tokens": n,
                "ratio": r,
                "peak_tensor_bytes": mem.peak,
                "largest_tensor_bytes": mem.largest,
                "tt_matrix_bytes": n * n * llm.dtype.itemsize,
                "kv_bytes": iam.kv_cache_bytes()["total"],
                "length_growth": n / previous["tokens"] if previous else None,
                "peak_growth": mem.peak / previous["peak_tensor_bytes"] if previous else None,
            }
        )
    return rows
