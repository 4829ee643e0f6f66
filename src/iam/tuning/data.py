"""Data for tuning the SLM (``iam tune``): instruction records in Alpaca format, scored on the response, and plain
text, scored on every token; both tokenized into examples of at most ``seq_len`` tokens.

Sources, by name:

- Instruction data (``objective="instruct"``): a JSON (one array) or JSONL file of ``{"instruction", "input",
  "output"}`` records (``input`` may be missing or empty); ``chatterbot`` (offline: chatterbot-corpus's English
  conversations as prompt/reply pairs, without the trivia the QA evaluation uses); ``alpaca`` (online:
  ``tatsu-lab/alpaca`` through ``datasets``).
- Plain text (``objective="lm"``): ``python-stdlib-train`` (standard-library modules disjoint from every evaluation
  and calibration set), any other name ``iam.eval.data.load_text`` knows, or a text file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import MappingConfig
from ..eval import data
from ..models.loading import load_tokenizer, read_configs

OBJECTIVES = ("instruct", "lm")
EVALUATION_TEXTS = ("wikipedia", "python-docs", "python-stdlib")
"""The texts the quality evaluations read (``iam eval perplexity``'s defaults, Table 4): never tuned on."""
IGNORE = -100
"""Label of a token that is not scored."""

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
"""The prompt for a tokenizer without a chat template (Alpaca's own format)."""


@dataclass(frozen=True)
class Example:
    """One training sequence: ``ids`` ``[T]`` and ``labels`` ``[T]`` (``IGNORE`` where not scored)."""

    ids: torch.Tensor
    labels: torch.Tensor


@dataclass
class TuningData:
    """Examples ready to train on, and what became of the records.

    Parameters
    ----------
    examples : the examples, in source order.
    sources : the source names they came from.
    objective : ``instruct`` or ``lm``.
    truncated : records cut to ``seq_len`` tokens (their response shortened).
    skipped : records whose prompt alone fills ``seq_len`` (no response token would be scored), or shorter than
        ``min_tokens`` (too short to establish a mapping: the SLM would get no gradient from them).
    """

    examples: list[Example]
    sources: list[str]
    objective: str
    truncated: int = 0
    skipped: int = 0

    @property
    def digest(self) -> str:
        """sha256 of every example's ids and labels, in order: what a resumed run must train on again."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(e.ids.numpy().tobytes() + b"|" + e.labels.numpy().tobytes() + b"#")
        return h.hexdigest()

    @property
    def tokens(self) -> int:
        """Scored tokens in all examples."""
        return sum(int((e.labels != IGNORE).sum()) for e in self.examples)

    def summary(self) -> dict:
        return {
            "sources": self.sources,
            "objective": self.objective,
            "examples": len(self.examples),
            "scored_tokens": self.tokens,
            "truncated": self.truncated,
            "skipped": self.skipped,
            "sha256": self.digest,
        }


def json_records(path: Path) -> Iterator[tuple[int, object]]:
    """``(line, record)`` of a JSONL file, or of a JSON file holding one array (the line where each record starts)."""
    text = data.read_text_file(path)
    space = re.compile(r"\s*")
    start = space.match(text).end()
    if text[start : start + 1] != "[":  # JSONL (lines split on "\n" only: JSON strings may hold U+2028 unescaped)
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield number, _decode(path, number, lambda line=line: json.loads(line))
        return
    decoder = json.JSONDecoder()
    i, number, counted = start + 1, 1, 0  # ``number`` is the line of position ``counted``

    def line_of(position: int) -> int:
        nonlocal number, counted
        number += text.count("\n", counted, position)
        counted = position
        return number

    while True:
        i = space.match(text, i).end()
        if text[i : i + 1] == "]":
            return
        line = line_of(i)
        record, i = _decode(path, line, lambda i=i: decoder.raw_decode(text, i))
        yield line, record
        i = space.match(text, i).end()
        if text[i : i + 1] == ",":
            i += 1
        elif text[i : i + 1] != "]":
            raise ValueError(f"{path}:{line_of(i)}: expected ',' or ']' between the records of the array.")


def _decode(path: Path, line: int, decode):
    try:
        return decode()
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line}: not valid JSON ({err.msg}).") from None


def check_record(where: str, record: object) -> dict:
    """An Alpaca record with ``instruction`` and ``output`` strings (``input`` optional), or ``ValueError`` naming
    ``where`` (file and line) and what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: a record must be a JSON object with instruction, input and output, got {type(record).__name__}."
        )
    missing = [k for k in ("instruction", "output") if k not in record]
    if missing:
        raise ValueError(
            f"{where}: the record has no {' and no '.join(missing)} field (Alpaca format: instruction, input, output)."
        )
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}.")
    if not record["output"].strip():
        raise ValueError(f"{where}: the response (output) is empty: there is nothing to learn from this record.")
    if not record["instruction"].strip():
        raise ValueError(f"{where}: the instruction is empty.")
    return record


def instruction_records(source: str) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of an instruction source: a JSON/JSONL file, ``chatterbot`` or ``alpaca``."""
    if source == "chatterbot":
        for i, (prompt, reply) in enumerate(data.chatterbot_pairs(data.chatterbot_topics()), 1):
            yield f"chatterbot #{i}", {"instruction": prompt, "input": "", "output": reply}
        return
    if source == "alpaca":
        path, config, split, *_ = data.ONLINE_QA["alpaca"]
        for i, row in enumerate(data._online(source, path, config, split), 1):
            yield f"alpaca #{i}", dict(row)
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {source!r} not found: give a JSON/JSONL file, chatterbot or alpaca.")
    for line, record in json_records(path):
        yield f"{path}:{line}", record


def encode_instruction(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of a record: the model's chat template where it has one (the response closed
    as the template closes a turn), else Alpaca's prompt and the response followed by EOS."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input", "").strip() else "")
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": record["output"]}], tokenize=False)
        if whole.startswith(prompt):
            response = whole[len(prompt) :]
        else:  # a template that rewrites earlier turns: score the reply and the end of turn as generated after the prompt
            response = record["output"] + (tokenizer.eos_token or "")
    else:
        given = f"### Input:\n{record['input']}\n\n" if record.get("input", "").strip() else ""
        prompt = ALPACA_PROMPT.format(instruction=record["instruction"], input=given)
        response = record["output"] + (tokenizer.eos_token or "")
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    return encode(prompt), encode(response)


def load_tuning_data(
    tokenizer,
    sources: Sequence[str],
    objective: str,
    seq_len: int,
    max_positions: int,
    limit: int | None = None,
    min_tokens: int = 1,
) -> TuningData:
    """Examples from ``sources`` for ``objective`` (see the module's docstring).

    Parameters
    ----------
    tokenizer : the pair's tokenizer.
    sources : source names or files.
    objective : ``instruct`` (loss on the response, with the chat template) or ``lm`` (loss on every token).
    seq_len : tokens per example (plain text is cut into non-overlapping blocks of this length; longer records
        are truncated, and counted).
    max_positions : the models' position limit: a record longer than that is an error naming its file and line.
    limit : at most this many examples.
    min_tokens : records shorter than this are skipped, and counted (the mapping's ``establish_threshold``).

    Returns
    -------
    ``TuningData``; ``ValueError`` for a bad record or source, naming the file and line.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    if not sources:
        raise ValueError("no tuning data given: name at least one source.")
    evaluated = [s for s in sources if s in EVALUATION_TEXTS]
    if evaluated:
        raise ValueError(
            f"{', '.join(evaluated)} is evaluation text (iam eval perplexity reads it): tune on python-stdlib-train, "
            "another text, or a file, so that no text used in tuning is evaluated on."
        )
    examples: list[Example] = []
    truncated = skipped = 0
    for source in sources:
        if objective == "lm":
            if source in ("chatterbot", "alpaca") or Path(source).suffix in (".json", ".jsonl"):
                raise ValueError(f"{source!r} is instruction data: use `objective` 'instruct'.")
            ids = torch.tensor(tokenizer(data.load_text(source), add_special_tokens=False).input_ids)
            if ids.numel() < seq_len:
                raise ValueError(f"{source!r} has {ids.numel()} tokens, fewer than one example of {seq_len}.")
            examples += [Example(b, b.clone()) for b in ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)]
            continue
        if source in data.STDLIB_MODULES or source in data.GENSIM_TEXTS or source in ("wikipedia", "python-docs"):
            raise ValueError(f"{source!r} is plain text: use `objective` 'lm'.")
        for where, record in instruction_records(source):
            prompt, response = encode_instruction(tokenizer, check_record(where, record))
            if len(prompt) + len(response) > max_positions:
                raise ValueError(
                    f"{where}: the record has {len(prompt) + len(response)} tokens, more than the models' "
                    f"{max_positions} positions."
                )
            if len(prompt) >= seq_len or len(prompt) + len(response) < min_tokens:
                skipped += 1
                continue
            truncated += len(prompt) + len(response) > seq_len
            ids = torch.tensor(prompt + response)[:seq_len]
            labels = ids.clone()
            labels[: len(prompt)] = IGNORE
            examples.append(Example(ids, labels))
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(
            f"no examples in {', '.join(sources)}: every record's prompt fills `seq_len` {seq_len}, or the whole record is "
            f"shorter than {min_tokens} tokens (too short to establish a mapping)."
        )
    return TuningData(examples, list(sources), objective, truncated, skipped)


def tuning_data(
    llm: str | os.PathLike,
    slm: str | os.PathLike,
    mapping: MappingConfig,
    sources: Sequence[str],
    objective: str,
    seq_len: int,
    limit: int | None = None,
    force: bool = False,
) -> TuningData:
    """The examples of tuning the pair ``llm``/``slm`` at ``mapping`` (``load_tuning_data`` with the LLM's tokenizer,
    within both models' positions, each long enough to set a mapping), checked before any weights load: the SLM's
    cache in its dtype, the pair's configs (``read_configs``; ``force`` as there), and ``seq_len`` between the
    mapping's ``establish_threshold`` and the positions."""
    if mapping.slm_cache != "native":
        raise ValueError("iam tune keeps the SLM cache in the model's dtype: int8 would cut the gradient (drop `slm_cache`).")
    llm_config, slm_config = read_configs(llm, slm, force=force)
    positions = min(llm_config.max_position_embeddings, slm_config.max_position_embeddings)
    if not mapping.establish_threshold <= seq_len <= positions:
        raise ValueError(
            f"`seq_len` {seq_len} must lie between `establish_threshold` {mapping.establish_threshold} (shorter "
            f"sequences set no mapping) and the models' {positions} positions."
        )
    tokenizer = load_tokenizer(llm)
    return load_tuning_data(tokenizer, sources, objective, seq_len, positions, limit, mapping.establish_threshold)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (padding not scored)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, width - n :], labels[row, width - n :], mask[row, width - n :] = e.ids, e.labels, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
