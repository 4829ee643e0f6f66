"""Analyses of attention across models (paper §3.3, Appendix B, D and Fig. 9): how similar LLM and SLM heads are
(with one tokenizer, or across two), whether a mapping's matches hold while decoding, which SLM heads a mapping
uses, and the mean attention maps of the SLM, the LLM and IAM's mapped result."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..core.checks import check_family, load_checked
from ..core.config import MappingConfig, check_mapped
from ..core.decoder import positions
from ..core.mapping import Mapping, tril_flat
from ..core.model import IAMForCausalLM
from ..core.similarity import METRICS
from ..models.loading import load_model, load_tokenizer, read_configs
from ..models.placement import check_device
from .alignment import align_spans, attention_probs, restrict, token_spans
from .windows import text_windows, window_texts

ALIGNMENT = "character spans: LCS of the two tokenizations' offset spans (tokens covering the same characters)"


def eval_similarity(llm, slm, windows, base: MappingConfig, progress: bool = True) -> dict:
    """Per LLM layer, the mean best-match similarity, and the LLM-layer x SLM-layer heatmap (mean over heads of
    the best head in that SLM layer)."""
    check_mapped([w.shape[1] for w in windows], [replace(base, ratio=1.0)])  # a mapping's window: no fewer tokens
    iam = IAMForCausalLM(llm, slm, replace(base, ratio=0.0))
    sim = torch.cat([head_similarity(iam, w) for w in tqdm(windows, desc="similarity", disable=not progress)], 1)  # [L, B, H, S]
    return similarity_summary(sim, slm.config.num_attention_heads, base.metric)


def similarity_summary(sim: torch.Tensor, slm_heads: int, metric: str) -> dict:
    """The similarity report from ``sim`` ``[L, B, H, L_s * H_s]`` (every LLM head against every SLM (layer, head),
    per window): per LLM layer the mean best-match similarity and the best SLM layer, the heatmap and the mean."""
    heat = sim.unflatten(-1, (-1, slm_heads)).amax(-1).mean((1, 2))  # [L, L_s]
    best = sim.amax(-1).mean((1, 2))
    rows = [
        {"llm_layer": i, "mean_best_similarity": best[i].item(), "best_slm_layer": int(heat[i].argmax())}
        for i in range(len(best))
    ]
    return {"rows": rows, "heatmap": heat.tolist(), "metric": metric, "mean": best.mean().item()}


def load_for_similarity(
    llm: str | os.PathLike,
    slm: str | os.PathLike,
    config: MappingConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    force: bool = False,
) -> tuple[nn.Module, nn.Module, PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """``(llm, slm, llm_tokenizer, slm_tokenizer)`` for ``eval_pair_similarity``: checked and loaded as a pair
    (``load_checked``) where the two share a tokenizer; else each on its own, of any supported families (analysis
    only: mapping refuses such a pair)."""
    llm_tokenizer, slm_tokenizer = load_tokenizer(llm), load_tokenizer(slm)
    if llm_tokenizer.get_vocab() == slm_tokenizer.get_vocab():
        big, small, tokenizer = load_checked(llm, slm, [config], dtype=dtype, device=device, force=force)
        return big, small, tokenizer, tokenizer
    check_device(device)
    for role, model_config in zip(("LLM", "SLM"), read_configs(llm, slm)):
        check_family(role, model_config)
    return load_model(llm, dtype, device)[0], load_model(slm, dtype, device)[0], llm_tokenizer, slm_tokenizer


def eval_pair_similarity(
    llm, slm, llm_tokenizer, slm_tokenizer, texts: Sequence[str], windows: int, tokens: int, base: MappingConfig
) -> dict:
    """The similarity report on ``windows`` windows of ``tokens`` LLM tokens from each of ``texts``: ``eval_similarity``
    where the two models share a tokenizer, else ``eval_cross_similarity`` on the same windows' characters."""
    if llm_tokenizer.get_vocab() == slm_tokenizer.get_vocab():
        cut = [w for text in texts for w in text_windows(llm_tokenizer, text, windows, tokens)]
        return eval_similarity(llm, slm, cut, base)
    cut = [w for text in texts for w in window_texts(llm_tokenizer, text, windows, tokens)]
    return eval_cross_similarity(llm, slm, llm_tokenizer, slm_tokenizer, cut, base)


def eval_cross_similarity(
    llm, slm, llm_tokenizer, slm_tokenizer, texts: Sequence[str], base: MappingConfig, progress: bool = True
) -> dict:
    """``eval_similarity`` for two models with different tokenizers (and families): each text, cut after its first
    ``truncation_threshold`` LLM tokens, is tokenized by both; each model attends over its own tokens, both attention
    matrices are restricted to the aligned tokens (``iam.eval.alignment``), and every LLM head is matched against
    every SLM (layer, head) there. ``alignment`` reports the tokens each side had and how many aligned."""
    metric = METRICS[base.metric]
    sims, counts = [], []
    for text in tqdm(texts, desc="similarity", disable=not progress):
        spans = token_spans(llm_tokenizer, text)[1][: base.truncation_threshold]
        text = text[: spans[-1][1]] if spans else ""
        (a_ids, a_spans), (b_ids, b_spans) = token_spans(llm_tokenizer, text), token_spans(slm_tokenizer, text)
        ia, ib = align_spans(a_spans, b_spans)
        counts.append({"llm_tokens": len(a_spans), "slm_tokens": len(b_spans), "aligned": len(ia)})
        if len(ia) < 2:
            raise ValueError(f"the two tokenizers share {len(ia)} token spans on the text {text[:40]!r}: nothing to compare.")
        a = tril_flat(restrict(attention_probs(llm, a_ids), ia), len(ia))  # [L, H, N]
        b = tril_flat(restrict(attention_probs(slm, b_ids), ib), len(ib)).flatten(0, 1)  # [L_s * H_s, N]
        sims.append(torch.stack([metric.score(layer, b) for layer in a])[:, None])  # [L, 1, H, S]
    result = similarity_summary(torch.cat(sims, 1), slm.config.num_attention_heads, base.metric)
    aligned = sum(c["aligned"] for c in counts) / sum(c["llm_tokens"] for c in counts)
    result["alignment"] = {"method": ALIGNMENT, "windows": counts, "aligned_share_of_llm_tokens": aligned}
    return result


def eval_consistency(llm, slm, tokenizer, windows, ratio: float, steps: int, base: MappingConfig, progress: bool = True) -> dict:
    """Paper §3.3: as decoding proceeds, does each mapped head's best match (recomputed on the whole growing
    context) stay the one chosen at prefill? Per mapped layer, the fraction of steps where it does."""
    config = replace(base, ratio=ratio)
    if not config.maps:
        raise ValueError(f"`ratio` {ratio} maps nothing: consistency follows the mapped layers' matches (use `ratio` > 0).")
    if steps < 1:
        raise ValueError(f"`steps` must be a whole number >= 1 (decode steps followed), got {steps}.")
    check_mapped([w.shape[1] for w in windows], [config])
    iam = IAMForCausalLM(llm, slm, config)
    probe = IAMForCausalLM(llm, slm, replace(base, ratio=0.0))
    agree: dict[int, list[float]] = {}
    for w in tqdm(windows, desc="consistency", disable=not progress):
        out = iam.generate(w, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
        mapping, seq = out.cache.mapping, out.sequences
        layers = mapping.mapped_layers
        best = [
            head_similarity(probe, seq[:, :k], truncation_threshold=k)[layers].argmax(-1)
            for k in range(w.shape[1], seq.shape[1] + 1)
        ]
        for j, layer in enumerate(layers):
            heads = mapping.layers[layer].heads  # a partly mapped layer: its mapped groups' heads only
            same = torch.stack([(b[j][:, heads] == best[0][j][:, heads]).float().mean() for b in best[1:]])
            agree.setdefault(layer, []).append(same.mean().item())
    rows = [{"llm_layer": layer, "consistency": sum(v) / len(v)} for layer, v in agree.items()]
    return {"rows": rows, "steps": steps, "ratio": ratio, "mean": sum(r["consistency"] for r in rows) / len(rows)}


@torch.inference_mode()
def establish(iam: IAMForCausalLM, window: torch.Tensor) -> Mapping:
    """The mapping ``iam`` establishes on one window ``[1, T]``; ``ValueError`` if the window is too short to map."""
    threshold = iam.mapping_config.establish_threshold
    if window.shape[1] < threshold or not iam.resolved.n_mapped:
        raise ValueError(
            f"nothing is mapped on a window of {window.shape[1]} tokens at ratio {iam.mapping_config.ratio}: "
            f"map some layers (`ratio` > 0) and use `tokens` >= establish_threshold {threshold}."
        )
    return iam(window, logits_to_keep=1).cache.mapping


def eval_mapping_stats(
    llm, slm, windows: Sequence[tuple[str, torch.Tensor]], ratio: float, base: MappingConfig, progress: bool = True
) -> dict:
    """Which SLM heads a mapping borrows, over many contexts (paper Appendix D, Fig. 12).

    Per window (``(text name, ids)``), each mapped LLM head's borrowed SLM heads and their blend weights. Returned:
    ``usage`` ``[L_s][H_s]``, how much each SLM (layer, head) is used (each borrowed head counted by its weight); per
    LLM head its mode (the best match chosen most often) and how often; how concentrated the use is; and, as
    ``rows``, per window the SLM layers it never needs (the SLM could stop after ``deepest_slm_layer``)."""
    iam = IAMForCausalLM(llm, slm, replace(base, ratio=ratio))
    n_slm, h_slm = slm.config.num_hidden_layers, slm.config.num_attention_heads
    usage = torch.zeros(n_slm * h_slm, dtype=torch.float64)
    best: dict[tuple[int, int], Counter] = {}
    rows = []
    for i, (name, w) in enumerate(tqdm(windows, desc="mapping-stats", disable=not progress)):
        mapping = establish(iam, w)
        heads, weights = mapping.mixture  # [1, M, H, k, 2], [1, M, H, k]
        flat = heads[0, ..., 0] * h_slm + heads[0, ..., 1]  # [M, H, k]
        valid = flat[..., 0] >= 0  # heads of mapped KV groups
        usage.index_add_(0, flat[valid].flatten().cpu(), weights[0][valid].flatten().double().cpu())
        for j, layer in enumerate(mapping.layers):  # the order of mixture's rows
            for h in valid[j].nonzero().flatten().tolist():
                best.setdefault((layer, h), Counter())[int(flat[j, h, 0])] += 1
        used = mapping.slm_layers
        never = sorted(set(range(n_slm)) - set(used))
        rows.append(
            {"text": name, "window": i, "slm_layers_used": len(used), "deepest_slm_layer": used[-1], "never_needed": never}
        )
    share = usage / usage.sum()
    order = share.argsort(descending=True)
    modes = []
    for (layer, h), counter in sorted(best.items()):
        pick, n = counter.most_common(1)[0]
        modes.append(
            {"llm_layer": layer, "llm_head": h, "slm_layer": pick // h_slm, "slm_head": pick % h_slm, "share": n / len(rows)}
        )
    top = int(order[0])
    concentration = {
        "top1_head": [top // h_slm, top % h_slm],
        "top1_share": share[top].item(),
        "top5_share": share[order[:5]].sum().item(),
        "heads_for_half_of_use": int((share[order].cumsum(0) < 0.5).sum()) + 1,
        "heads_never_used": int((usage == 0).sum()),
        "slm_heads": n_slm * h_slm,
        "mode_agreement": sum(m["share"] for m in modes) / len(modes),
    }
    never_any = sorted(set.intersection(*(set(r["never_needed"]) for r in rows)))
    return {
        "rows": rows,
        "ratio": ratio,
        "blend": iam.mapping_config.blend,
        "usage": usage.view(n_slm, h_slm).tolist(),
        "concentration": concentration,
        "modes": modes,
        "slm_layers_never_needed_on_any_window": never_any,
    }


def eval_attention_maps(llm, slm, window: torch.Tensor, ratio: float, base: MappingConfig) -> dict:
    """The mean attention matrix over all layers and heads of the SLM and of the LLM on one context ``[1, T]``, and,
    over IAM's mapped layers at ``ratio``, the LLM's own mean beside the mean of what IAM borrows there (each mapped
    head's SLM heads mixed by their blend weights) (paper Fig. 9). ``rows`` score each map: its cosine to the LLM's
    own mean on the same layers, the attention on the first token and on the token itself."""
    iam = IAMForCausalLM(llm, slm, replace(base, ratio=ratio))
    mapping = establish(iam, window)
    own, small = attention_probs(llm, window), attention_probs(slm, window)  # [L, H, T, T], [L_s, H_s, T, T]
    heads, weights = (x[0].to(small.device) for x in mapping.mixture)  # [M, H, k, 2], [M, H, k]
    valid = heads[..., 0, 0] >= 0
    borrowed = small[heads[..., 0].clamp_min(0), heads[..., 1].clamp_min(0)]  # [M, H, k, T, T]
    mixed = (weights.nan_to_num(0)[..., None, None] * borrowed).sum(2)[valid]
    maps = {
        "SLM": small.flatten(0, 1),
        "LLM": own.flatten(0, 1),
        "LLM, mapped layers": own[list(mapping.layers)][valid],  # the order of mixture's rows
        "IAM, mapped layers": mixed,
    }
    means = {name: m.mean(0) for name, m in maps.items()}
    n = window.shape[1]
    reference = tril_flat(means["LLM, mapped layers"], n)
    rows = [
        {
            "map": name,
            "matrices": len(maps[name]),
            "cosine_to_llm_mapped": torch.nn.functional.cosine_similarity(tril_flat(m, n), reference, 0).item(),
            "first_token_share": m[:, 0].mean().item(),
            "diagonal_share": m.diagonal().mean().item(),
        }
        for name, m in means.items()
    ]
    return {
        "rows": rows,
        "tokens": n,
        "ratio": ratio,
        "mapped_layers": mapping.units,
        "maps": {name: m.tolist() for name, m in means.items()},
    }


@torch.inference_mode()
def head_similarity(iam: IAMForCausalLM, input_ids: torch.Tensor, truncation_threshold: int | None = None) -> torch.Tensor:
    """Similarity ``[L, B, H, L_s * H_s]`` of every LLM head to every SLM (layer, head) on the window of
    ``input_ids`` (unpadded, ``[B, T]``), by ``iam``'s metric: the analysis behind ``iam similarity``."""
    ids = input_ids.to(iam.device)
    truncation = truncation_threshold or iam.mapping_config.truncation_threshold
    mask = torch.ones_like(ids)
    _, establishing = iam._slm_window(iam.new_cache(), ids, mask, positions(mask, ids.shape[1]), truncation)
    return iam._probe(ids, establishing, borrowable=False)
