"""The transformers side of the engine tier, run in the project's own environment (transformers 5.24): ``pair DIR
FAMILY`` saves a tiny random pair of the family whose head size vLLM's CPU attention serves (64) and exports it;
``generate FOLDER`` prints ``IAMForCausalLM.generate``'s greedy tokens with the folder's fixed mapping, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # the suite's conftest: the tiny models and the tokenizer

from conftest import char_tokenizer, left_pad, tiny  # noqa: E402
from iam import IAMForCausalLM  # noqa: E402
from iam.cli import main  # noqa: E402

PROMPTS = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((20, 33, 47, 9))]
"""Batch 4, mixed lengths (one shorter than establish_threshold: a fixed mapping maps it too)."""
NEW_TOKENS = 16


def pair(folder: Path, family: str) -> None:
    for name, model in [("llm", tiny(family, 4, 256, 4, 2, seed=0)), ("slm", tiny(family, 2, 128, 2, 1, seed=1))]:
        model.save_pretrained(folder / name)
        char_tokenizer().save_pretrained(folder / name)
    (folder / "calibration.txt").write_text("A paged cache holds the keys and values of every request. " * 30)
    argv = ["export-vllm", "--llm", str(folder / "llm"), "--slm", str(folder / "slm"), "--ratio", "0.5"]
    sys.exit(main([*argv, "--text", str(folder / "calibration.txt"), "--tokens", "64", "--out", str(folder / "iam")]))


def generate(folder: Path) -> None:
    iam = json.loads((folder / "config.json").read_text())["iam"]
    model = IAMForCausalLM.from_pretrained(
        llm=iam["pair"][0],
        slm=iam["pair"][1],
        head_mapping=str(folder / iam["head_mapping"]),
        progress=False,
    )
    ids, mask = left_pad([torch.tensor(p)[None] for p in PROMPTS])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    print(json.dumps({"prompts": PROMPTS, "tokens": out[:, ids.shape[1] :].tolist()}))


if __name__ == "__main__":
    {"pair": pair, "generate": generate}[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
