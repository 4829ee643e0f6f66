"""``iam export-vllm``: an IAM folder that vLLM serves through the ``iam_vllm`` plugin.

The folder holds the LLM's ``config.json`` naming the IAM architecture, with an ``iam`` block (the SLM's config, its
weights folder, the mapping settings); ``head_mapping.json``, the fixed mapping (``iam.core.fixed``) chosen over
calibration windows; the LLM's tokenizer and generation config; and links to the LLM's safetensors files, which vLLM
loads as its own checkpoint (the SLM's are read from its folder by the model). Written into a temporary folder and
renamed into place whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from iam_vllm import ARCHITECTURES, check_served

from .core.checks import check_pair_configs, load_checked, planned
from .core.config import MappingConfig
from .core.fixed import FixedMapping, choose
from .core.model import IAMForCausalLM
from .core.resolution import resolve
from .eval.analysis import head_similarity
from .io import atomic_folder, check_writable
from .models.loading import check_tokenizers, load_tokenizer, read_configs
from .models.loading import resolve as model_folder

HEAD_MAPPING = "head_mapping.json"
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def check_exportable(llm: str | os.PathLike, slm: str | os.PathLike, config: MappingConfig, progress: bool = True):
    """The pair's configs and the resolved mapping config, after every check that needs no weights: a family the
    plugin serves, one tokenizer, whole mapped layers and blend 1 (what the vLLM model serves)."""
    llm_config, slm_config = read_configs(llm, slm, progress)
    check_pair_configs(llm_config, slm_config)
    if llm_config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"the vLLM plugin serves {sorted(ARCHITECTURES)} pairs, not {llm_config.model_type!r}: serve this pair with "
            "IAMForCausalLM (transformers)."
        )
    check_tokenizers(load_tokenizer(llm, progress), load_tokenizer(slm, progress))
    resolved = resolve(config, llm_config, slm_config)
    plan = planned(resolved, llm_config)
    if plan is None or not plan:
        raise ValueError(
            "export needs a mapping fixed before any input: a ratio above 0 with strategy back, front, "
            "two-region or a calibrated order ('similar' chooses per input)."
        )
    check_served(plan, resolved.config.blend, llm_config.num_key_value_heads)
    return llm_config, slm_config, resolved, plan


@torch.no_grad()
def calibrated_mapping(iam: IAMForCausalLM, windows: list[torch.Tensor], plan, source: dict) -> FixedMapping:
    """Each mapped head's SLM head of highest mean similarity over the ``windows`` (``head_similarity``, the analysis
    behind ``iam similarity``)."""
    mean = torch.stack([head_similarity(iam, w.to(iam.device))[:, 0] for w in windows]).mean(0)  # [L, H, L_s * H_s]
    llm, slm = iam.llm.config, iam.slm.config
    return choose(mean, plan, llm.num_key_value_heads, slm.num_attention_heads, llm, slm, iam.mapping_config.metric, **source)


def export_vllm(
    llm: str | os.PathLike,
    slm: str | os.PathLike,
    out: str | os.PathLike,
    config: MappingConfig,
    windows_of=None,
    source: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write the IAM folder ``out`` for the pair and return what it holds. The mapping is ``config.head_mapping`` (a
    file, checked against the pair), else chosen over the windows ``windows_of(tokenizer)`` returns."""
    check_writable(out, "--out")
    llm_config, slm_config, resolved, plan = check_exportable(llm, slm, config, progress)
    fixed = resolved.fixed
    if fixed is None:
        big, small, tok = load_checked(llm, slm, [config], progress=progress)
        fixed = calibrated_mapping(IAMForCausalLM.from_pair(big, small, config), windows_of(tok), plan, source or {})
    llm_folder, slm_folder = model_folder(llm, progress).resolve(), model_folder(slm, progress).resolve()
    record = json.loads((llm_folder / "config.json").read_text())
    iam = {
        "pair": [str(llm), str(slm)],
        "slm_folder": str(slm_folder),
        "slm": json.loads((slm_folder / "config.json").read_text()),
        "head_mapping": HEAD_MAPPING,
        "mapped_layers": sorted(fixed.plan),
        "metric": fixed.metric,
    }
    record.update(architectures=[ARCHITECTURES[llm_config.model_type]], iam=iam)
    out = Path(out)
    with atomic_folder(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(record, indent=1) + "\n")
        fixed.save(tmp / HEAD_MAPPING)
        for name in COPIED:
            if (llm_folder / name).is_file():
                shutil.copyfile(llm_folder / name, tmp / name)
        for weights in [*llm_folder.glob("*.safetensors"), *llm_folder.glob("*.safetensors.index.json")]:
            (tmp / weights.name).symlink_to(weights)
    return {
        "out": str(out),
        "mapped_layers": sorted(fixed.plan),
        "slm_depth": fixed.slm_depth,
        "llm_folder": str(llm_folder),
        "slm_folder": str(slm_folder),
        "units": fixed.units(llm_config.num_key_value_heads),
    }
