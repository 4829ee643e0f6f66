"""Run under ``torchrun --nproc-per-node 2`` (gloo, CPU) by tests/test_parallel.py: IAM with the LLM sharded by
transformers' tensor parallelism against the same pair in one process, one case per mapped-layer path.

``python tp_checks.py FOLDER OUT``: FOLDER holds ``llm`` and ``slm`` (saved tiny models with tokenizers); every rank
writes ``OUT/rank<r>.json``: per case the largest logit difference and whether the greedy tokens are equal, and the
checks that need the sharded models themselves.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from iam import IAMForCausalLM, MappingConfig, cli
from iam.core import parallel
from iam.core.eviction import H2O

CASES = {
    "plain": {"layers": [1, 3]},
    "kv-groups": {"layers": [(1, 0), (2, 1), 3]},
    "blend": {"layers": [2, 3], "blend": 2},
    "local-window": {"layers": [1, 3], "local_window": 4, "local_sinks": 2},
    "similar": {"strategy": "similar", "ratio": 0.5},
    "int8-slm": {"layers": [(2, 0), 3], "slm_cache": "int8"},
}
"""Mapping configs compared in a forward and greedy generation (``establish_threshold`` 8 is added)."""


def run(model: IAMForCausalLM, ids: torch.Tensor, mask: torch.Tensor, **generate):
    """One forward over ``ids`` and 6 greedily generated tokens."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        settings = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True, **generate}
        gen = model.generate(ids, attention_mask=mask, **settings)
    return out, gen


def compare(tp: IAMForCausalLM, one: IAMForCausalLM, ids, mask, **generate) -> dict:
    """The largest logit difference, and whether the tokens, the whole head mapping (every rank must hold all of it)
    and the slots kept by eviction are the same."""
    try:
        a, ga = run(tp, ids, mask, **generate)
        b, gb = run(one, ids, mask, **generate)
        (pa, wa), (pb, wb) = a.cache.mapping.mixture, b.cache.mapping.mixture
        probe = a.cache.mapping.probe
        kept, scores = ga.cache.kept, gb.cache.kept and gb.cache.kept.scores
    except Exception as e:  # reported, so that the test names the case
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "max_diff": (a.logits - b.logits).abs().max().item(),
        "same_tokens": torch.equal(ga.sequences, gb.sequences),
        "same_mapping": torch.equal(pa, pb)
        and torch.allclose(wa, wb, atol=1e-5, equal_nan=True)
        and (probe is None or torch.allclose(probe, b.cache.mapping.probe, atol=1e-5)),
        "same_kept": kept is None
        or (torch.equal(kept.positions, gb.cache.kept.positions) and torch.allclose(kept.scores, scores, atol=1e-4)),
    }


def main(folder: Path, out: Path) -> None:
    torch.set_num_threads(1)
    tp = IAMForCausalLM.from_pretrained(folder / "llm", folder / "slm", tp_plan="auto", progress=False, layers=[1, 3])
    rank = dist.get_rank()
    llm_one = AutoModelForCausalLM.from_pretrained(folder / "llm").eval()
    slm = tp.slm
    attn = tp.llm.model.layers[0].self_attn
    report: dict = {
        "rank": rank,
        "llm_v_rows": attn.v_proj.weight.to_local().shape[0],
        "llm_v_rows_whole": llm_one.model.layers[0].self_attn.v_proj.weight.shape[0],
        "slm_sharded": parallel.shard_of(slm.model.layers[0].self_attn) is not None,
        "cases": {},
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (1, 20), generator=g)
    mask = torch.ones_like(ids)
    batch = torch.randint(1, 97, (2, 20), generator=g)
    batch_mask = torch.ones_like(batch)
    batch[0, :7], batch_mask[0, :7] = 0, 0  # left padding

    def both(*inputs, eviction=None, generate=None, **mapping) -> dict:
        config = MappingConfig(establish_threshold=8, **mapping)
        tp_model, one_model = (IAMForCausalLM.from_pair(llm, slm, config, eviction) for llm in (tp.llm, llm_one))
        return compare(tp_model, one_model, *(inputs or (ids, mask)), **(generate or {}))

    cases = report["cases"]
    for name, mapping in CASES.items():
        cases[name] = both(**mapping)
    cases["eviction"] = both(eviction=H2O(0.6, recent=4), layers=[2])
    cases["beam-search"] = both(layers=[1, 3], generate={"num_beams": 2})
    cases["left-padded"] = both(batch, batch_mask, layers=[(1, 1), 3], blend=2)
    # the same run with each rank reading another rank's part of the head map must be told apart
    wrong = parallel.rank_map
    parallel.rank_map = lambda hmap, positions, device: wrong(hmap, positions.flip(0), device)
    import iam.core.attention as attention

    attention.rank_map = parallel.rank_map
    try:
        cases["misread-map"] = both(layers=[1, 3])
    finally:
        attention.rank_map = parallel.rank_map = wrong
    try:
        IAMForCausalLM.from_pair(tp.llm, AutoModelForCausalLM.from_pretrained(folder / "slm", tp_plan="auto"))
        report["sharded_slm_refused"] = None
    except ValueError as e:
        report["sharded_slm_refused"] = str(e)
    report["cli"] = {name: run_cli(argv, out / f"{name}-rank{rank}") for name, argv in cli_commands(folder).items()}
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


def cli_commands(folder: Path) -> dict[str, list[str]]:
    """``iam`` commands run tensor parallel here and in one process by the test (``--out`` is added)."""
    pair = ["--llm", str(folder / "llm"), "--slm", str(folder / "slm"), "--establish-threshold", "8", "--json"]
    text = ["--text", str(folder / "text.txt"), "--windows", "1", "--tokens", "40"]
    return {
        "perplexity": ["eval", "perplexity", *pair, *text, "--ratios", "0,0.5"],
        "bench": ["bench", *pair, "--ratios", "0.5", "--prompt", "16", "--batch", "1", "--new-tokens", "3", "--repeats", "1"],
    }


def run_cli(argv: list[str], out: Path) -> dict:
    """Exit code, what was printed, and the report folder's files of ``iam ARGV --tp --out OUT``."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main([*argv, "--tp", "--out", str(out)])
    return {"code": code, "stdout": printed.getvalue(), "files": sorted(p.name for p in out.glob("*")) if out.exists() else []}


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
