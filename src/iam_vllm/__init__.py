"""IAM in vLLM: a plugin (entry point group ``vllm.general_plugins``) that registers the IAM architectures with vLLM's
``ModelRegistry``, so that ``vllm.LLM(model=<iam folder>)`` and ``vllm serve <iam folder>`` run a folder written by
``iam export-vllm``. Importing this package imports nothing of vLLM; the model class loads lazily."""

from __future__ import annotations

ARCHITECTURES = {"qwen2": "IAMQwen2ForCausalLM", "llama": "IAMLlamaForCausalLM"}
"""The served LLM families (``model_type``) and the architecture name an exported folder's config carries."""


def check_served(plan: dict[int, tuple[int, ...]], blend: int, n_kv: int) -> None:
    """``ValueError`` unless the mapping is what the vLLM model serves: whole mapped layers (every one of the ``n_kv``
    KV groups), each head borrowing one SLM head."""
    partial = sorted(layer for layer, groups in plan.items() if len(groups) != n_kv)
    if partial or blend != 1:
        raise ValueError(
            f"the vLLM model serves whole mapped layers with blend 1; this mapping maps single KV groups of layers {partial} "
            f"and blend {blend}: use --strategy back (or front, two-region) and --blend 1."
        )


def register() -> None:
    """Register the IAM architectures (vLLM calls every general plugin in every process; registering twice is a
    no-op)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"iam_vllm.model:{name}")
