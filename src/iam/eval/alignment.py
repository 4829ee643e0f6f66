"""Attention of two models with different tokenizers, compared on the same text (paper Appendix B): every layer's
full attention matrices, and the tokens the two tokenizations share.

Alignment: the longest common subsequence of the two sequences of character spans, from the tokenizers' offset
mappings. Spans of one tokenization strictly increase, so that LCS is exactly the spans both tokenizations produce
(a token of one matches a token of the other iff they cover the same characters); one merge finds them. Both
attention matrices are restricted to the aligned tokens, and each row renormalised over them (a distribution
again), so a pair that shares one tokenizer compares exactly as without alignment.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.cache import slm_cache
from ..core.decoder import Pass, decoder_layers, local_window, positions, softcap
from ..core.mapping import window_attention


def token_spans(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``text``'s token ids ``[1, T]`` (no special tokens added) and each token's ``(start, end)`` character span.

    Raises ``ValueError`` for a tokenizer without offset mappings (a slow, Python tokenizer)."""
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer without offset mappings: load its fast version.")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return torch.tensor([enc["input_ids"]]), [tuple(s) for s in enc["offset_mapping"]]


def align_spans(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Indices into ``a`` and into ``b`` of the tokens covering the same characters, in order: the longest common
    subsequence of two strictly increasing span sequences, found by one merge. Empty spans never align."""
    i = j = 0
    ia, ib = [], []
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            if a[i][1] > a[i][0]:
                ia.append(i)
                ib.append(j)
            i, j = i + 1, j + 1
        elif a[i] < b[j]:
            i += 1
        else:
            j += 1
    return ia, ib


@torch.inference_mode()
def attention_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Every layer's causal attention of a ``*ForCausalLM`` of a served family over unpadded ``ids`` ``[1, T]``, as the
    layer attends (Gemma's local windows and soft-cap), in float32: ``[L, H, T, T]``."""
    ids = ids.to(model.device)
    cache = slm_cache(model.config)  # every layer keeps every key (transformers' own keeps a local layer's window)
    mask = torch.ones_like(ids)
    n = model.config.num_hidden_layers
    queries = Pass(model, ids, mask, positions(mask, ids.shape[1]), cache).queries(n)
    attns = [layer.self_attn for layer in decoder_layers(model)]
    keys = [layer.keys for layer in cache.layers]
    probs = [window_attention(queries[i], keys[i], a.scaling, softcap(a), local_window(a)) for i, a in enumerate(attns)]
    return torch.stack([p[0] for p in probs])


def restrict(probs: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Attention ``[..., T, T]`` restricted to the tokens ``index`` (queries and keys), each row renormalised over
    them: ``[..., n, n]``."""
    idx = torch.tensor(index, device=probs.device)
    sub = probs[..., idx, :][..., idx]
    return sub / sub.sum(-1, keepdim=True).clamp_min(torch.finfo(sub.dtype).tiny)
