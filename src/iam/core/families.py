"""The model families IAM serves, and what sets each apart for the layer-by-layer decoder: sliding-window layers
(served as the borrowing layer's own where the family interleaves them, else only where the window is wider than any
context), attention-logit soft-capping, and the checks that refuse a pair before any weights load.

Query/key norms (Qwen3, Gemma 3), fused QKV projections (Phi-3), partial rotary embeddings and sandwich norms
(Gemma) are read off the modules themselves (``iam.core.decoder``); the registry holds what a module does not say.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from .eviction import EvictionPolicy

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    """What IAM needs to know of a family beyond its modules.

    Parameters
    ----------
    local_layers : sliding-window ("local") layers interleave with global ones and are served as such: a local LLM
        layer borrows from local SLM layers only, within its own window (Gemma 2 and 3). Elsewhere a sliding window is
        served only where it is wider than any context (``check_windows``).
    softcap : the attention function soft-caps logits by ``attn_logit_softcapping`` (Gemma 2; Gemma 3 does not).
    fused_qkv : Q, K and V come from one ``qkv_proj`` (Phi-3); mapped layers project its V rows only.
    """

    local_layers: bool = False
    softcap: bool = False
    fused_qkv: bool = False


FAMILIES: dict[str, Family] = {
    "qwen2": Family(),
    "llama": Family(),
    "qwen3": Family(),
    "mistral": Family(),
    "phi3": Family(fused_qkv=True),
    "gemma2": Family(local_layers=True, softcap=True),
    "gemma3_text": Family(local_layers=True),
}
"""Served families by ``model_type``."""

REFUSED: dict[str, str] = {
    "gemma3": "a Gemma 3 vision-language checkpoint (model_type 'gemma3'); IAM serves Gemma 3 text models "
    "(model_type 'gemma3_text', Gemma3ForCausalLM): Gemma 3 1B, or a larger one's language model saved on its own",
}
"""Families refused with a reason more useful than the list of served ones."""


def family(config: PretrainedConfig) -> Family:
    """The ``Family`` of a config (one without anything apart where unlisted: ``check_family`` refuses those)."""
    return FAMILIES.get(getattr(config, "model_type", None), Family())


def head_dim(config: PretrainedConfig) -> int:
    """A model's attention head size: its ``head_dim``, or ``hidden_size / num_attention_heads`` where it sets none."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def local_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer, the window of a local layer served as such (``Family.local_layers``), else ``None``: its cache keeps
    the last ``window - 1`` slots, as transformers' own does (``iam.core.cache.Windowed``)."""
    local = family(config).local_layers
    return [w if local else None for w in layer_windows(config)]


def check_family(role: str, config: PretrainedConfig) -> None:
    """Raise ``ValueError`` unless ``config`` is of a served family."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(f"{role} is {REFUSED[model_type]}.")
    if model_type not in FAMILIES:
        raise ValueError(f"{role} has model_type {model_type!r}; supported families: {list(FAMILIES)}.")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"{role} attends bidirectionally (use_bidirectional_attention=True, an embedding model); IAM serves causal LMs."
        )


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window as the model's attention applies it (``None``: global attention): per
    ``layer_types`` where the config has them (Qwen2/3, Gemma), else ``sliding_window`` in every layer (Mistral,
    Phi-3)."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        return [window] * config.num_hidden_layers
    return [window if kind == SLIDING else None for kind in kinds]


def layer_kinds(config: PretrainedConfig) -> list[str]:
    """Each layer's kind, ``"full_attention"`` or ``"sliding_attention"``."""
    return [FULL if w is None else SLIDING for w in layer_windows(config)]


def check_windows(role: str, config: PretrainedConfig) -> None:
    """Raise ``ValueError`` where a sliding window narrower than the model's positions would reach a layer that IAM
    serves with full attention (every family but those with ``local_layers``)."""
    if family(config).local_layers:
        return
    limit = config.max_position_embeddings
    narrow = [i for i, w in enumerate(layer_windows(config)) if w is not None and w < limit]
    if not narrow:
        return
    window = config.sliding_window
    if hasattr(config, "use_sliding_window"):
        how, fix = "use_sliding_window=True", "set use_sliding_window=False in its config.json (as its own default)"
    else:
        how = f"sliding_window={window}"
        fix = (
            "set sliding_window to null in its config.json where the model was trained without one, or "
            f"max_position_embeddings to {window} (IAM then serves contexts within the window)"
        )
    raise ValueError(
        f"{role} has sliding-window attention in layers {narrow} ({how}), narrower than its {limit} positions; IAM "
        f"serves {config.model_type} with full attention, exact only where the window is wider than any context: "
        f"{fix}, or use another model."
    )


def check_kinds(llm: PretrainedConfig, slm: PretrainedConfig) -> None:
    """Raise ``ValueError`` where an LLM layer kind has no SLM layer of that kind to borrow from (a local head borrows
    from a local SLM layer, a global head from a global one)."""
    if not family(llm).local_layers:
        return
    llm_kinds, slm_kinds = layer_kinds(llm), set(layer_kinds(slm))
    for kind in sorted(set(llm_kinds) - slm_kinds):
        layers = [i for i, k in enumerate(llm_kinds) if k == kind]
        raise ValueError(
            f"LLM layers {layers} are {kind} but the SLM has no {kind} layer: a local (sliding-window) head borrows "
            "only from a local SLM layer, a global head only from a global one. Use an SLM with both kinds of layers."
        )


def check_blend(llm: PretrainedConfig, slm: PretrainedConfig, blend: int) -> None:
    """Raise ``ValueError`` where a head of an LLM layer with local layers cannot borrow ``blend`` distinct SLM heads
    of its own layer's kind."""
    if not family(llm).local_layers:
        return
    kinds = layer_kinds(slm)
    for kind in sorted(set(layer_kinds(llm))):
        heads = kinds.count(kind) * slm.num_attention_heads
        if blend > heads:
            raise ValueError(
                f"blend {blend} exceeds the SLM's {heads} heads in {kind} layers: an LLM head of a {kind} layer borrows "
                "from those only. Lower the blend."
            )


def check_features(
    llm: PretrainedConfig, local_window: int | None, eviction: EvictionPolicy | None, tensor_parallel: bool = False
) -> None:
    """Raise ``ValueError`` where a feature is asked of a family that does not serve it: tensor parallelism with a
    fused QKV projection (its row shards mix Q, K and V heads), token eviction and the exact local window with local
    layers or soft-capped logits (they compute attention without either)."""
    served = family(llm)
    if tensor_parallel and eviction is not None and eviction.reconstruct:
        raise ValueError(
            f"{type(eviction).__name__} scores per KV group from every rank's heads, which is not served under tensor "
            "parallelism: load the LLM without tp_plan, or use another policy."
        )
    if tensor_parallel and served.fused_qkv:
        raise ValueError(
            f"{llm.model_type} fuses Q, K and V in one qkv_proj, which IAM does not shard: load it without tp_plan "
            "(device_map spreads it over several devices)."
        )
    if not (served.local_layers or served.softcap):
        return
    why = f"{llm.model_type} has local (sliding-window) layers" + (" and soft-capped logits" if served.softcap else "")
    if eviction is not None:
        raise ValueError(f"{why}: token eviction is not served for it (evicted slots would shift the windows); drop it.")
    if local_window:
        raise ValueError(f"{why}: local_window is not served for it (use the model's own local layers); drop it.")
