"""IAM in vLLM: a plugin (entry point group ``vllm.general_plugins``) that registers the IAM architectures with vLLM's
``ModelRegistry``, so that ``vllm.LLM(model=<iam folder>)`` and ``vllm serve <iam folder>`` run a folder written by
``iam export-vllm``. Importing this package imports nothing of vLLM; the model class loads lazily."""

from __future__ import annotations

ARCHITECTURES = {"qwen2": "IAMQwen2ForCausalLM"}
"""The served LLM family (``model_type``) and the architecture name an exported folder's config carries."""


def register() -> None:
    """Register the IAM architectures (vLLM calls every general plugin in every process; registering twice is a
    no-op)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"iam_vllm.model:{name}")
