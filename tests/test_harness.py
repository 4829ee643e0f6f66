"""lm-evaluation-harness drives IAM: the three local tasks end to end through ``simple_evaluate`` on the tiny pair."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from conftest import iam  # noqa: E402
from iam.eval.harness import IAMLM, LOCAL_TASKS, local_tasks, mapping_args  # noqa: E402

LIMIT = 4


@pytest.fixture(scope="module")
def manager(tmp_path_factory) -> TaskManager:
    return TaskManager(include_path=str(local_tasks(tmp_path_factory.mktemp("tasks"))))


def metrics(model, manager: TaskManager, task: str) -> dict[str, float]:
    results = simple_evaluate(model=model, tasks=[task], task_manager=manager, limit=LIMIT)["results"][task]
    return {k: float(v) for k, v in results.items() if "," in k and "stderr" not in k}


@pytest.mark.parametrize("task", sorted(LOCAL_TASKS))
def test_local_task_at_ratio_zero_equals_lm_evals_own_hf_model(pair, tokenizer, manager, task):
    llm, slm = pair
    ours = metrics(IAMLM(pretrained=iam(llm, slm, ratio=0.0), tokenizer=tokenizer), manager, task)
    theirs = metrics(HFLM(pretrained=llm, tokenizer=tokenizer, batch_size=1), manager, task)
    assert ours and ours == theirs
    mapped = metrics(IAMLM(pretrained=iam(llm, slm, ratio=0.5), tokenizer=tokenizer), manager, task)
    assert mapped.keys() == ours.keys() and all(math.isfinite(v) for v in mapped.values())
    if task == "iam_wikipedia_ppl":  # long documents: the mapping is established and changes the likelihood
        assert mapped["byte_perplexity,none"] != ours["byte_perplexity,none"]


def test_the_iam_model_type_is_registered():
    assert get_model("iam") is IAMLM


def test_batches_are_refused_and_mapping_args_are_parsed(pair, tokenizer):
    with pytest.raises(ValueError, match="one sequence at a time .batch_size=1., got batch_size=4"):
        IAMLM(pretrained=iam(*pair), tokenizer=tokenizer, batch_size=4)
    with pytest.raises(ValueError, match=r"\['ratio'\] would be ignored"):
        IAMLM(pretrained=iam(*pair), tokenizer=tokenizer, ratio=0.3)
    args = {"ratio": 0.3, "layers": "20;21:1", "max_length": 64}
    assert mapping_args(args) == {"ratio": 0.3, "layers": [20, (21, 1)]} and args == {"max_length": 64}
