"""Token eviction from the KV cache, one small dataclass per policy and a registry (after kvpress).

Every policy keeps one set of tokens per sequence. With ``scope="all"`` (the default) it is shared by all cache layers
of both models: the LLM's own layers, its mapped (V-only) layers, and the SLM's layers that the mapped ones borrow
attention from. So a borrowed SLM row never reads a token whose V is gone, and the rule is simple to state: a token
is in the cache of every layer, or of none. With ``scope="unmapped"`` the kept set applies only to the LLM's layers
that keep K and V; the mapped layers and the SLM keep every token, so the rule still holds for every mapped head:
its borrowed row and its V cover the same tokens, all of them.

Evicted slots are compacted away (their bytes are freed); a sequence that keeps fewer tokens than its neighbours is
padded at the front, and those slots are masked like left padding, so attention over the kept tokens renormalises
by itself. Positions stay true: cached keys carry their RoPE, and new tokens take the
positions the caller gives.

Scores are attention mass on each cached token, summed over heads and layers: the LLM's unmapped layers score
with their own attention, and mapped layers with the SLM attention they borrow, which the SLM computes anyway
(with ``scope="unmapped"``, the evicted layers' own attention only).

The reconstruction policies (``KVzip``, ``DraftKVzip``) score once, after prefill, by teacher-forcing a model through
a repeat of the context, and let each KV group of the layers that keep K choose its own tokens, with one width per
layer (``iam.core.kept.Kept.own``, each layer under its own mask); the mapped layers and the SLM keep the shared set.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from .errors import ConfigError

SCOPES = ("all", "unmapped")
"""Which layers a policy evicts from (``EvictionPolicy.scope``)."""


@dataclass(frozen=True)
class EvictionPolicy(ABC):
    """Base class.

    Parameters
    ----------
    budget : tokens kept per sequence: a fraction in ``(0, 1]`` of its tokens so far (a ``float``), or a count (a
        positive ``int``).
    scope : the layers it evicts from. ``"all"``: every cache layer of both models, one kept set (see the module's
        rule). ``"unmapped"``: only the LLM's layers that keep K and V (no mapped KV group); its mapped layers and the
        SLM keep every token, so a mapped head still reaches the whole context through the SLM.
    """

    budget: float | int = 0.8
    scope: str = "all"
    needs_scores = False  # whether the policy reads attention scores
    decode = True  # whether it evicts during decode as well as after prefill
    reconstruct: ClassVar[str | None] = None  # which model repeats the context to score it (``KVzip``): "llm" or "slm"

    def __post_init__(self) -> None:
        for f in fields(self):  # a policy's own fields are token counts, each with its least value
            value, least = getattr(self, f.name), f.metadata.get("least")
            if least is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ConfigError(
                    f.name, f"{type(self).__name__}.{{param}} must be an integer >= {least} (tokens), got {value!r}."
                )
        b = self.budget
        fraction = isinstance(b, float) and 0 < b <= 1
        count = isinstance(b, int) and not isinstance(b, bool) and b >= 1
        if not (fraction or count):
            raise ConfigError(
                "budget", f"{{param}} must be a fraction in (0, 1] or a token count (a positive integer), got {b!r}."
            )
        if self.scope not in SCOPES:
            raise ConfigError("scope", f"{{param}} must be one of {SCOPES}, got {self.scope!r}.")
        if count and b < self.reserved:
            raise ConfigError(
                "budget", f"{{param}} {b} is smaller than the {self.reserved} tokens {type(self).__name__} always keeps."
            )

    @property
    def reserved(self) -> int:
        """Tokens the policy always keeps (sinks, a recent window)."""
        return 0

    @property
    def partial(self) -> bool:
        """Whether it evicts from some layers only (``scope="unmapped"``)."""
        return self.scope == "unmapped"

    def observed_queries(self) -> int | None:
        """How many of a forward's latest queries score the slots (policies with ``needs_scores`` that attention
        scores): ``None`` for all of them."""
        return None

    def kept(self, n_real: torch.Tensor) -> torch.Tensor:
        """``[B]`` tokens each sequence keeps out of its ``n_real`` real tokens."""
        if isinstance(self.budget, float):
            keep = torch.ceil(n_real.double() * self.budget).long()
        else:
            keep = torch.full_like(n_real, self.budget)
        return torch.minimum(torch.maximum(keep, n_real.clamp(max=self.reserved)), n_real)

    @abstractmethod
    def priority(self, scores: torch.Tensor | None, valid: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` keep priority of each cache slot, higher kept first (invalid slots are never kept).

        Parameters
        ----------
        scores : ``[B, S]`` attention mass on each slot (policies with ``needs_scores``).
        valid : ``[B, S]`` real, kept tokens.
        age : ``[B, S]`` how many real tokens came after each slot (0 for the newest).
        """


def protect_slots(priority: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``priority`` with the slots of ``mask`` always kept (infinite priority)."""
    return priority.masked_fill(mask, math.inf)


def _sinks(valid: torch.Tensor, age: torch.Tensor, n: int) -> torch.Tensor:
    """Each sequence's first ``n`` real tokens (the oldest kept ones)."""
    first = age.masked_fill(~valid, -1).amax(-1, keepdim=True)  # age of each sequence's first real token
    return age > first - n


@dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """Attention sinks plus the most recent tokens (Xiao et al. 2023): the first ``sinks`` tokens of each sequence
    and as many of the latest as the budget allows.

    Parameters
    ----------
    budget : as for ``EvictionPolicy``.
    sinks : first tokens always kept.
    """

    sinks: int = field(default=4, metadata={"least": 0})

    @property
    def reserved(self) -> int:
        return self.sinks

    def priority(self, scores, valid, age):
        return protect_slots(-age.double(), _sinks(valid, age, self.sinks))


@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """Heavy hitters (Zhang et al. 2023): the tokens with the most attention accumulated so far, plus a recent
    window; evicts after prefill and at every decode step.

    Parameters
    ----------
    budget : as for ``EvictionPolicy``.
    recent : latest tokens always kept.
    """

    recent: int = field(default=8, metadata={"least": 0})
    needs_scores = True

    @property
    def reserved(self) -> int:
        return self.recent

    def priority(self, scores, valid, age):
        return protect_slots(scores.double(), age < self.recent)


@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """SnapKV (Li et al. 2024): after prefill, keep the tokens that the last ``window`` prompt tokens attend to
    most (pooled over a ``kernel`` of neighbours), plus that window; decode then appends without evicting.

    Parameters
    ----------
    budget : as for ``EvictionPolicy``.
    window : the observation window: last prompt tokens whose attention scores the rest, always kept.
    kernel : max-pooling width over neighbouring tokens' scores (odd).
    """

    window: int = field(default=16, metadata={"least": 1})
    kernel: int = field(default=5, metadata={"least": 1})
    needs_scores = True
    decode = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise ConfigError("kernel", f"SnapKV.{{param}} must be odd (pooling centred on each token), got {self.kernel}.")

    @property
    def reserved(self) -> int:
        return self.window

    def observed_queries(self) -> int | None:
        return self.window

    def priority(self, scores, valid, age):
        pooled = torch.nn.functional.max_pool1d(scores[:, None].float(), self.kernel, 1, self.kernel // 2)[:, 0]
        return protect_slots(pooled.double(), age < self.window)


@dataclass(frozen=True)
class KVzip(EvictionPolicy):
    """KVzip (Kim et al. 2025), query-agnostic: after prefill the model is teacher-forced through ``prompt`` and then
    the context, ``chunk`` context tokens at a time, on a scratch copy of its cache that is then discarded. A cached
    pair's score is the most attention any repeat query gives it (softmax over the cache and the repeat so far), the
    maximum over its KV group's query heads. Each KV group of every layer without a mapped group keeps its own best
    slots; the layers share the ``budget`` through one ranking of every layer's slots (a layer's width is what its
    best group wins, and its other groups fill it with their own best), as KVzip ranks all heads against one
    threshold; layers with a mapped group and the SLM keep one shared set, scored through the SLM heads the mapped
    heads borrow. Decode then appends without evicting.

    Parameters
    ----------
    budget : as for ``EvictionPolicy``: the share each sequence keeps over the layers that keep K (on average per
        layer) and in the shared set.
    sinks : first tokens always kept.
    layerwise : every layer keeps the same count (the budget) instead of one ranking over the layers.
    chunk : context tokens repeated per pass (bounds the scratch cache and the score matrix).
    prompt : token ids of the repeat instruction, put before each chunk (``repeat_prompt(tokenizer)``); empty: the
        context alone is repeated.
    """

    sinks: int = field(default=4, metadata={"least": 0})
    chunk: int = field(default=2048, metadata={"least": 1})
    prompt: tuple[int, ...] = ()
    layerwise: bool = False
    needs_scores = True
    decode = False
    reconstruct = "llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        prompt = tuple(self.prompt)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in prompt):
            raise ConfigError(
                "prompt", f"{type(self).__name__}.{{param}} must be token ids (non-negative integers), got {self.prompt!r}."
            )
        object.__setattr__(self, "prompt", prompt)

    @property
    def reserved(self) -> int:
        return self.sinks

    def priority(self, scores, valid, age):
        return protect_slots(scores.double(), _sinks(valid, age, self.sinks))


@dataclass(frozen=True)
class DraftKVzip(KVzip):
    """``KVzip`` scored by the SLM: the SLM repeats the context instead of the LLM, at a fraction of the cost. Its
    scores reach the LLM's KV groups through the head mapping (mapped layers keep the set their borrowed SLM heads
    choose) and, for layers that keep K, from the SLM layer at the same relative depth, KV group to KV group. With
    the LLM alone the SLM prefills the context for scoring only, and its cache is released afterwards.

    Parameters
    ----------
    As for ``KVzip``.
    """

    reconstruct = "slm"


POLICIES: dict[str, type[EvictionPolicy]] = {
    "h2o": H2O,
    "snapkv": SnapKV,
    "streaming": StreamingLLM,
    "kvzip": KVzip,
    "draft-kvzip": DraftKVzip,
}
"""Eviction policies by name (``--eviction``)."""


def make_policy(
    name: str | None, budget: float | int | None = None, scope: str = "all", prompt: tuple[int, ...] = ()
) -> EvictionPolicy | None:
    """The policy ``name`` with ``budget`` (its default where ``None``) over ``scope``; ``None`` for no eviction.
    ``prompt``: the repeat instruction of the reconstruction policies (``repeat_prompt``), ignored by the others."""
    if name is None:
        if budget is not None:
            raise ConfigError("eviction", f"a budget needs an eviction policy: set {{param}} to one of {sorted(POLICIES)}.")
        return None
    if name not in POLICIES:
        raise ConfigError("eviction", f"{{param}} policy must be one of {sorted(POLICIES)}, got {name!r}.")
    cls = POLICIES[name]
    kwargs = {"scope": scope, **({} if budget is None else {"budget": budget})}
    return cls(**kwargs, prompt=prompt) if issubclass(cls, KVzip) else cls(**kwargs)


REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."
"""KVzip's repeat instruction, appended to the context as the user's words."""


def repeat_prompt(tokenizer) -> tuple[int, ...]:
    """Token ids that ask the model to repeat the context (``KVzip.prompt``): ``REPEAT_INSTRUCTION``, then what the
    tokenizer's chat template puts after a user message (the assistant's turn opened), if it has one."""
    tail = ""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00CONTEXT\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
        tail = text.split(marker)[1]
    return tuple(tokenizer(REPEAT_INSTRUCTION + tail, add_special_tokens=False).input_ids)


def parse_budget(text: str) -> float | int:
    """``"0.8"`` is a fraction, ``"256"`` a token count; ``"1"`` is the fraction 1 (keep every token)."""
    value = float(text)
    return int(value) if value.is_integer() and value > 1 else value


def _probs(q: torch.Tensor, k: torch.Tensor, scaling: float, valid: torch.Tensor, first: int, chunk: int):
    """Causal attention probabilities of queries ``first ..`` of ``q`` (the newest slots) over every slot of ``k``, in
    float32 and in chunks of queries (no T x T matrix): yields ``(rows, probs)``, the chunk's slot indices ``[c]`` and
    ``[B, H, c, S]``. Padding is never attended to, and a query that can attend to nothing gets zeros."""
    b, h, t, _ = q.shape
    s = k.shape[2]
    k = k.repeat_interleave(h // k.shape[1], 1).float()
    cols = torch.arange(s, device=q.device)
    for i in range(first, t, chunk):
        scores = (q[:, :, i : i + chunk].float() @ k.transpose(-1, -2)) * scaling  # [B, H, c, S]
        rows = torch.arange(i, i + scores.shape[2], device=q.device) + (s - t)
        allowed = (cols[None] <= rows[:, None])[None, None] & valid.bool()[:, None, None, :]
        yield rows, scores.masked_fill(~allowed, -math.inf).softmax(-1).nan_to_num(0.0)


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    valid: torch.Tensor,
    last: int | None = None,
    chunk: int = 128,
    head_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention mass ``[B, S]`` each cache slot receives, summed over heads and queries, in float32 and in chunks of
    queries (no T x T matrix).

    Parameters
    ----------
    q : ``[B, H, t, d]`` post-RoPE queries of the ``t`` newest slots.
    k : ``[B, H_kv, S, d]`` the cached keys of every slot, the new ones last.
    scaling : the attention scaling.
    valid : ``[B, S]`` slots holding real tokens (padding neither attends nor is attended to).
    last : only the last ``last`` queries (SnapKV's observation window).
    head_weight : ``[B, H]`` weight of each head's mass (default: 1 each).
    """
    t = q.shape[2]
    mass = torch.zeros(q.shape[0], k.shape[2], device=q.device)
    for _, probs in _probs(q, k, scaling, valid, 0 if last is None else max(t - last, 0), chunk):
        mass += probs.sum((1, 2)) if head_weight is None else (probs.sum(2) * head_weight[..., None]).sum(1)
    return mass


def repeat_scores(
    q: torch.Tensor, k: torch.Tensor, scaling: float, valid: torch.Tensor, context: int, chunk: int = 128
) -> torch.Tensor:
    """KVzip's score ``[B, H, context]`` of each of the first ``context`` cache slots per query head: the most
    attention any of the ``t`` repeat queries gives it, in float32 and in chunks of queries (no T x T matrix).

    Parameters
    ----------
    q : ``[B, H, t, d]`` post-RoPE queries of the repeat, the ``t`` newest slots.
    k : ``[B, H_kv, S, d]`` the keys of every slot: the context's ``context`` first, the repeat's last.
    scaling : the attention scaling.
    valid : ``[B, S]`` slots holding real tokens; a padding query scores nothing.
    """
    out = torch.zeros(*q.shape[:2], context, device=q.device)
    for rows, probs in _probs(q, k, scaling, valid, 0, chunk):
        probs = probs * valid.bool()[:, None, rows, None]  # a padding query scores nothing
        out = torch.maximum(out, probs[..., :context].amax(2))
    return out
