"""Cutting texts into the token windows evaluations score: evenly spread, non-overlapping, of one length."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .alignment import token_spans


def window_starts(n: int, windows: int, tokens: int) -> list[int]:
    """First token of ``windows`` non-overlapping windows of ``tokens`` tokens, evenly spread over ``n`` tokens."""
    if n < windows * tokens:
        raise ValueError(f"text has {n} tokens, fewer than `windows` {windows} x `tokens` {tokens}.")
    stride = (n - tokens) // max(windows - 1, 1)
    return [i * stride for i in range(windows)]


def text_windows(tokenizer, text: str, windows: int, tokens: int) -> list[torch.Tensor]:
    """``windows`` non-overlapping windows of ``tokens`` tokens, evenly spread over ``text``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return [ids[s : s + tokens][None] for s in window_starts(ids.numel(), windows, tokens)]


def window_texts(tokenizer, text: str, windows: int, tokens: int) -> list[str]:
    """The characters of ``windows`` windows of ``tokens`` tokens, evenly spread over ``text`` (the text itself, not
    decoded tokens: what another tokenizer reads too)."""
    _, spans = token_spans(tokenizer, text)
    return [text[spans[s][0] : spans[s + tokens - 1][1]] for s in window_starts(len(spans), windows, tokens)]


def lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens of each of ``texts``."""
    return [len(ids) for ids in tokenizer(list(texts)).input_ids]
