"""The side-by-side run: every configuration on the same samples, answers reused where a resumed run has them."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig

from ...core.checks import checked
from ...core.config import MappingConfig
from ...core.eviction import repeat_prompt
from ...core.model import IAMForCausalLM
from ..runs import side_by_side
from ..setup import Setup, build, configured
from ..tradeoff import kv_shares
from .protocol import answer, correct, samples_for
from .statistics import frontier, summarize
from .tasks import Sample, make_samples


def prepare(
    tokenizer,
    llm_config: PretrainedConfig,
    slm_config: PretrainedConfig,
    setups: Sequence[Setup],
    configs: Sequence[MappingConfig],
    tasks: Sequence[str],
    tokens: Sequence[int],
    n: int,
    seed: int = 0,
    spread: str = "even",
    filler: str = "prose",
) -> dict[tuple[str, int], list[Sample]]:
    """A run's samples (``samples_for``), checked with everything else that needs no weights: each setup's run spec
    for the pair (``checked``: its eviction, scope and window), and every context, question and answer within both
    models' positions."""
    for setup, config in zip(setups, configs):
        checked(config, llm_config, slm_config, setup.eviction())
    limit = min(llm_config.max_position_embeddings, slm_config.max_position_embeddings)
    return samples_for(tokenizer, tasks, tokens, n, limit, seed, spread, filler)


def eval_retrieval(
    llm,
    slm,
    tokenizer,
    base,
    setups: Sequence[Setup],
    samples: dict[tuple[str, int], list[Sample]],
    protocol: str = "agnostic",
    bins: int = 5,
    done: dict | None = None,
    record=None,
    progress: bool = True,
) -> dict:
    """Every configuration of ``setups`` on the same samples of each task at each context length, side by side.

    Parameters
    ----------
    base : the ``MappingConfig`` every setup varies (ratio and local window).
    samples : the samples by task and context length (``samples_for``).
    done : answers already measured, by ``(label, task, tokens, sample)``: reused, not run again (resuming), where
        they answer each of the sample's questions.
    record : called with ``(key, answers)`` after each sample is measured (e.g. to append it to a file).

    Returns
    -------
    A dict with ``rows`` (one per configuration, task and length; see ``summarize``) and ``examples``.
    """
    from tqdm.auto import tqdm

    done = dict(done or {})
    total = len(setups) * sum(len(s.questions) for ss in samples.values() for s in ss)
    bar = tqdm(total=total, desc="retrieval", unit="question", disable=not progress)
    rows, examples = [], {}
    for setup in setups:
        iam = None
        for (task, t), sample_list in samples.items():
            answers = []
            for i, sample in enumerate(sample_list):
                key = (setup.label, task, t, i)
                if len(done.get(key, ())) != len(sample.questions):
                    iam = iam or build(llm, slm, base, setup, repeat_prompt(tokenizer))
                    result = []
                    for j, (question, (text, kv, seconds)) in enumerate(
                        zip(sample.questions, answer(iam, tokenizer, sample, protocol))
                    ):
                        result.append(
                            {
                                "question": j,
                                "depth": question.depth,
                                "correct": correct(text, question.answers),
                                "prediction": text,
                                "expected": list(question.answers),
                                **kv_shares(kv),
                                "seconds": seconds,
                                "scoring_seconds": kv["scoring_s"],
                                "context_tokens": sample.tokens,
                            }
                        )
                    done[key] = result
                    if record is not None:
                        record(key, result)
                bar.update(len(sample.questions))
                bar.set_postfix_str(setup.label)
                answers += [dict(a, sample=i) for a in done[key]]
            row = summarize(setup, task, answers, bins, [s.context for s in sample_list])
            row["tokens"] = t
            rows.append(row)
            examples.setdefault(setup.label, {})[f"{task}/{t}"] = answers[:4]
    bar.close()
    frontier(rows)
    return {"rows": rows, "examples": examples, "protocol": protocol, "depth_bins": bins}


def demo(llm, slm, tokenizer, base, setups: Sequence[Setup], tokens: int = 1024, seed: int = 0) -> list[dict]:
    """One multikey context of about ``tokens`` tokens, cached and then asked about each of its needles, by each of
    ``setups``: per setup its answers, how many are right, and the LLM KV it dropped."""
    sample = make_samples(tokenizer, "multikey", 1, tokens, seed)[0]
    configs = [({"method": s.label}, configured(base, s), s) for s in setups]

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        answers = answer(iam, tokenizer, sample, "agnostic")
        kv = answers[-1][1]
        return {
            "answers": [text for text, _, _ in answers],
            "expected": [q.answers[0] for q in sample.questions],
            "correct": sum(correct(text, q.answers) for (text, _, _), q in zip(answers, sample.questions)),
            "llm_kv_dropped": 1 - kv["llm"] / kv["baseline"],
            "seconds": sum(sec for _, _, sec in answers),
        }

    return side_by_side(llm, slm, configs, score, progress=False, prompt=repeat_prompt(tokenizer))
