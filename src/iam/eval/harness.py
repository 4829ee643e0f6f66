"""lm-evaluation-harness on IAM: the model type ``iam`` (an ``HFLM`` over ``IAMForCausalLM``) and three local tasks
over offline data.

lm-eval 0.4 finds model types only in its own registry, which importing this module fills: ``iam-lm-eval`` is
lm-eval's own command line with ``iam`` registered (``iam-lm-eval --model iam --model_args
llm=qwen2.5-coder-1.5b,slm=qwen2.5-coder-0.5b,ratio=0.3 --tasks ...``), and ``iam eval harness`` runs the LLM
alone and each ratio side by side. Any lm-eval task works (MMLU, HellaSwag, ... online); ``local_tasks()`` writes
three that need no network:

- ``iam_trivia_mc``: multiple choice over chatterbot's trivia, the answer among three other answers (``acc``).
- ``iam_wikipedia_ppl``: rolling log-likelihood of gensim's Wikipedia articles (word and byte perplexity).
- ``iam_trivia_qa``: generated answers to the trivia questions, stopped at a newline (``exact_match``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from ..core.config import MappingConfig
from ..core.model import IAMForCausalLM
from ..core.selection import parse_unit
from ..io import write_atomic
from ..models.loading import cache_root, load_tokenizer
from .data import trivia, trivia_choices, wikipedia_articles
from .runs import ratio_configs, side_by_side

MAPPING_FIELDS = tuple(MappingConfig.__dataclass_fields__)

LOCAL_TASKS = {
    "iam_trivia_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
    "iam_wikipedia_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    },
    "iam_trivia_qa": {
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": True,
            }
        ],
        "filter_list": [
            {"name": "strip", "filter": [{"function": "regex", "regex_pattern": r"^\s*(.*?)\s*$"}, {"function": "take_first"}]}
        ],
    },
}
"""lm-eval task configs of the local tasks (each gets ``dataset_path: json`` over a file ``local_tasks`` writes)."""

WIKIPEDIA_CHARS = 2000
"""Characters of each Wikipedia article in ``iam_wikipedia_ppl`` (the first ones: the lead, on a CPU budget)."""


def local_documents() -> dict[str, list[dict]]:
    """The local tasks' documents, from the offline data."""
    pairs = trivia()
    mc = trivia_choices(pairs)
    return {
        "iam_trivia_mc": [{"question": i["question"], "choices": i["choices"], "answer": i["answer"]} for i in mc],
        "iam_wikipedia_ppl": [{"text": a[:WIKIPEDIA_CHARS]} for a in wikipedia_articles()],
        "iam_trivia_qa": [{"question": q, "answer": a} for q, a in pairs],
    }


def local_tasks(folder: str | Path | None = None) -> Path:
    """Write the local tasks (a YAML and a JSONL file each) into ``folder`` (default ``$IAM_CACHE/harness``);
    returns it, for ``lm_eval.tasks.TaskManager(include_path=...)`` or ``--include_path``."""
    folder = Path(folder) if folder is not None else cache_root() / "harness"
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in local_documents().items():
        data = folder / f"{name}.jsonl"
        write_atomic(data, "".join(json.dumps(d) + "\n" for d in docs))
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            **LOCAL_TASKS[name],
        }
        write_atomic(folder / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    return folder


def mapping_args(args: dict) -> dict:
    """``MappingConfig`` fields out of lm-eval's ``--model_args`` (strings and numbers as lm-eval parses them)."""
    mapping = {k: args.pop(k) for k in MAPPING_FIELDS if k in args}
    if isinstance(mapping.get("layers"), (str, int)):
        mapping["layers"] = [parse_unit(u) for u in str(mapping["layers"]).split(";") if u.strip()]
    return mapping


@register_model("iam")
class IAMLM(HFLM):
    """lm-eval's ``HFLM`` over an ``IAMForCausalLM``: loglikelihood, loglikelihood_rolling and generate_until.

    Parameters
    ----------
    llm, slm : aliases, GGUF files or folders (see ``iam.models.loading``); ignored with ``pretrained``.
    pretrained : an ``IAMForCausalLM`` already built.
    tokenizer : default: the LLM's.
    dtype, device : where to load ``llm``/``slm``.
    batch_size : must be 1. lm-eval right-pads log-likelihood batches without a mask, and padding inside the
        establishing window would change a row's mapping.
    **kwargs : ``MappingConfig`` fields (``ratio=0.3``, ``strategy=back``, ``layers=20;21;22:1``, ...) and ``HFLM``
        arguments.
    """

    def __init__(
        self,
        llm: str = "qwen2.5-coder-1.5b",
        slm: str = "qwen2.5-coder-0.5b",
        pretrained: IAMForCausalLM | None = None,
        tokenizer=None,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int | str = 1,
        **kwargs,
    ) -> None:
        if str(batch_size) != "1":
            raise ValueError(f"the iam model type evaluates one sequence at a time (batch_size=1), got batch_size={batch_size}.")
        mapping = mapping_args(kwargs)
        if pretrained is None:
            pretrained = IAMForCausalLM.from_pretrained(llm, slm, dtype=getattr(torch, dtype), device=device, **mapping)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(llm)
        elif mapping:
            raise ValueError(f"{sorted(mapping)} would be ignored: pretrained is an IAMForCausalLM with its own config.")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=1, **kwargs)


def evaluate(llm, slm, tokenizer, tasks: list[str], ratios: list[float], base: MappingConfig, limit: int | None = None) -> dict:
    """``lm_eval.simple_evaluate`` of the LLM alone and IAM at each ratio, side by side: one row per ratio, task
    and metric (the local tasks are written first, under ``$IAM_CACHE/harness``)."""
    manager = TaskManager(include_path=str(local_tasks()))

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        model = IAMLM(pretrained=iam, tokenizer=tokenizer)
        return {"results": simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit)["results"]}

    rows = []
    for run in side_by_side(llm, slm, ratio_configs(base, ratios), score, progress=False):
        for task, metrics in run["results"].items():
            for key, value in metrics.items():
                name, _, filtered = key.partition(",")
                if filtered and "stderr" not in name and isinstance(value, (int, float)):
                    rows.append({"ratio": run["ratio"], "task": task, "metric": name, "filter": filtered, "value": float(value)})
    base_values = {(row["task"], row["metric"]): row["value"] for row in rows if row["ratio"] == 0}
    for row in rows:
        reference = base_values[(row["task"], row["metric"])]
        row["change"] = row["value"] / reference - 1 if reference else None
    return {"rows": rows, "tasks": tasks, "limit": limit}


def main() -> None:
    """``iam-lm-eval``: lm-eval's command line, with the ``iam`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
