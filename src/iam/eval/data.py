"""Evaluation text and questions that work offline, with the real online data sets behind a flag.

- Wikipedia: the 107 real articles in gensim's test data (redirects dropped, markup removed by
  ``gensim.corpora.wikicorpus.filter_wiki``), standing in for WikiText-2.
- Trivia: chatterbot-corpus's English trivia Q/A pairs.
- Lee's news corpus and Crime and Punishment, also in gensim's test data; Python standard-library source (two
  disjoint module sets); Python's Language Reference (English technical prose, shipped with CPython).
"""

from __future__ import annotations

import bz2
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Plain-text files shipped in gensim's test data: Lee's news corpus and a novel.
GENSIM_TEXTS = {
    "lee-news": "test/test_data/lee_background.cor",
    "crime-and-punishment": "test/test_data/crime-and-punishment.txt",
}


def _package_file(package: str, relative: str, extra: str) -> Path:
    try:
        module = __import__(package)
    except ImportError:
        raise FileNotFoundError(f"{package} is not installed: pip install 'iam-llm[{extra}]'") from None
    path = Path(module.__file__).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}; reinstall it.")
    return path


@lru_cache(maxsize=1)
def wikipedia_pages() -> tuple[tuple[str, str], ...]:
    """``(title, wiki markup)`` of the real Wikipedia articles shipped in gensim's test data (redirects dropped)."""
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(_package_file("gensim", WIKI_FILE, "eval")) as f:
        return tuple((title, text) for title, text, _ in extract_pages(f) if not text.lstrip().lower().startswith("#redirect"))


def wiki_prose(markup: str) -> str:
    """Wiki markup as clean prose (``gensim.corpora.wikicorpus.filter_wiki``, bold/italic quotes and blank runs removed)."""
    from gensim.corpora.wikicorpus import filter_wiki

    prose = re.sub(r"'{2,}", "", filter_wiki(markup))
    return re.sub(r"\n\s*\n+", "\n\n", prose).strip()


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[str, ...]:
    """The real Wikipedia articles shipped in gensim's test data, as clean prose."""
    return tuple(p for p in (wiki_prose(text) for _, text in wikipedia_pages()) if p)


HEADING = re.compile(r"^=+[^=\n]+=+[ \t]*$", re.M)


def wikipedia_summaries() -> tuple[list[dict], dict[str, int]]:
    """Summarization pairs from the Wikipedia articles: the body (from the first section heading on) as the document,
    the lead section (before it) as the reference summary. Returns the pairs (``title``, ``document``,
    ``summary``) and how many articles were skipped, by reason (no section heading, an empty lead, an empty body)."""
    docs, skipped = [], Counter()
    for title, text in wikipedia_pages():
        heading = HEADING.search(text)
        if heading is None:
            skipped["no section heading"] += 1
            continue
        lead, body = wiki_prose(text[: heading.start()]), wiki_prose(text[heading.start() :])
        if not lead:
            skipped["empty lead section"] += 1
        elif not body:
            skipped["empty body"] += 1
        else:
            docs.append({"title": title, "document": body, "summary": lead})
    return docs, dict(skipped)


def govreport_summaries() -> tuple[list[dict], dict[str, int]]:
    """GovReport's test split (online, through ``datasets``): reports and their expert summaries, as
    ``wikipedia_summaries`` returns them (a blank report or summary is skipped)."""
    rows = _online("govreport", "ccdv/govreport-summarization", None, "test")
    pairs = [(r.strip(), s.strip()) for r, s in zip(rows["report"], rows["summary"])]
    docs = [{"title": f"govreport-{i}", "document": r, "summary": s} for i, (r, s) in enumerate(pairs) if r and s]
    blank = len(pairs) - len(docs)
    return docs, ({"blank report or summary": blank} if blank else {})


SUMMARIES = {"wikipedia": wikipedia_summaries, "govreport": govreport_summaries}


def load_summaries(name: str) -> tuple[list[dict], dict[str, int]]:
    """Documents with reference summaries: ``wikipedia`` (offline: article body, lead section) or ``govreport``
    (online); see ``wikipedia_summaries``."""
    if name not in SUMMARIES:
        raise ValueError(f"unknown summarization data set {name!r}; use one of {', '.join(SUMMARIES)}.")
    return SUMMARIES[name]()


def wikipedia_text() -> str:
    return "\n\n".join(wikipedia_articles())


def chatterbot_pairs(names: Sequence[str] = ("trivia",)) -> list[tuple[str, str]]:
    """``(prompt, reply)`` pairs of chatterbot-corpus's English conversation files ``names`` (``trivia``, ...): the
    first two turns of each conversation."""
    import yaml

    pairs = []
    for name in names:
        path = _package_file("chatterbot_corpus", f"data/english/{name}.yml", "eval")
        conversations = yaml.safe_load(path.read_text())["conversations"]
        pairs += [(str(q).strip(), str(a).strip()) for q, a, *_ in (c for c in conversations if len(c) >= 2)]
    return pairs


def chatterbot_topics() -> list[str]:
    """The English chatterbot-corpus files other than ``trivia`` (the QA evaluation's): data for ``iam tune``."""
    folder = _package_file("chatterbot_corpus", "data/english/trivia.yml", "eval").parent
    return sorted(p.stem for p in folder.glob("*.yml") if p.stem != "trivia")


def trivia() -> list[tuple[str, str]]:
    """chatterbot-corpus's English trivia as ``(question, answer)`` pairs."""
    return chatterbot_pairs(["trivia"])


STDLIB_MODULES = {
    # evaluation text
    "python-stdlib": ("argparse", "json.decoder", "collections", "dataclasses", "pathlib", "textwrap", "difflib", "heapq"),
    # a disjoint set, for calibration
    "python-stdlib-calib": ("logging", "subprocess", "tarfile", "email.message", "http.client", "configparser"),
    # a third disjoint set, for tuning the SLM (``iam tune``)
    "python-stdlib-train": (
        *("typing", "inspect", "functools", "enum", "ast", "tokenize", "pickle", "zipfile", "shutil", "threading"),
        *("csv", "datetime", "fractions", "statistics", "string", "calendar", "optparse", "gettext", "unittest.case"),
        *("queue", "smtplib", "urllib.parse", "pprint", "copy", "shlex", "glob", "fnmatch", "tempfile", "bisect"),
        *("random", "uuid", "base64", "contextlib", "traceback", "warnings", "weakref"),
    ),
}


def python_stdlib_text(name: str = "python-stdlib") -> str:
    """Real Python source of a fixed list of standard-library modules (``STDLIB_MODULES``, disjoint sets for
    evaluation, calibration and tuning): a second, different kind of text."""
    import importlib
    import inspect

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in STDLIB_MODULES[name])


# Online data sets through Hugging Face ``datasets``: (path, config, split, field[, answer field]).
ONLINE_TEXTS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "govreport": ("ccdv/govreport-summarization", None, "test", "report"),
}
ONLINE_QA = {
    "hotpotqa": ("hotpot_qa", "distractor", "validation", "question", "answer"),
    "alpaca": ("tatsu-lab/alpaca", None, "train", "instruction", "output"),
}


def _online(name: str, path: str, config: str | None, split: str):
    try:
        from datasets import load_dataset
    except ImportError:
        raise FileNotFoundError(f"--dataset {name} needs the datasets package: pip install 'iam-llm[online]'") from None
    return load_dataset(path, config, split=split)


def python_docs_text() -> str:
    """Python's Language Reference sections, as shipped with every CPython in ``pydoc_data`` (what ``help()``
    shows): English technical prose with short code examples."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text_file(path: str | Path) -> str:
    """The text of the file ``path``, read as UTF-8; ``ValueError`` naming the file where it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it to UTF-8 first.") from None


def load_text(name: str) -> str:
    """Text for perplexity: ``wikipedia``, ``lee-news``, ``python-docs``, ``python-stdlib``, ``python-stdlib-calib``
    (offline), ``wikitext2``, ``govreport`` (online, via ``datasets``) or a file path."""
    if name == "wikipedia":
        return wikipedia_text()
    if name == "python-docs":
        return python_docs_text()
    if name in STDLIB_MODULES:
        return python_stdlib_text(name)
    if name in GENSIM_TEXTS:
        return _package_file("gensim", GENSIM_TEXTS[name], "eval").read_text(encoding="utf-8", errors="replace")
    if name in ONLINE_TEXTS:
        path, config, split, field = ONLINE_TEXTS[name]
        return "\n\n".join(_online(name, path, config, split)[field])
    path = Path(name)
    if not path.is_file():
        names = ", ".join(["wikipedia", "python-docs", *GENSIM_TEXTS, *STDLIB_MODULES, *ONLINE_TEXTS])
        raise FileNotFoundError(f"text file {name!r} not found (or use one of {names}).")
    return read_text_file(path)


def load_qa(name: str) -> list[tuple[str, str]]:
    """Question/answer pairs: ``trivia`` (offline) or ``hotpotqa``, ``alpaca`` (online, via ``datasets``)."""
    if name == "trivia":
        return trivia()
    if name not in ONLINE_QA:
        raise ValueError(f"unknown QA data set {name!r}; use one of trivia, {', '.join(ONLINE_QA)}.")
    path, config, split, question, answer = ONLINE_QA[name]
    rows = _online(name, path, config, split)
    return [(str(q), str(a)) for q, a in zip(rows[question], rows[answer])]


def trivia_choices(pairs: Sequence[tuple[str, str]], n_choices: int = 4, seed: int = 0) -> list[dict]:
    """MMLU-format items from Q/A pairs: the right answer plus distractors drawn from other answers."""
    rng = random.Random(seed)
    answers = sorted({a for _, a in pairs})
    items = []
    for q, a in pairs:
        choices = rng.sample([x for x in answers if x != a], n_choices - 1) + [a]
        rng.shuffle(choices)
        items.append({"question": q, "choices": choices, "answer": choices.index(a)})
    return items


def load_items(path: str | None, limit: int | None) -> list[dict]:
    """MMLU-format JSONL (question, choices, answer index); default: trivia with distractors from other answers."""
    if path == "mmlu":
        items = [dict(r) for r in _online("mmlu", "cais/mmlu", "all", "test")]
    elif path:
        items = []
        for number, line in enumerate(read_text_file(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err}).") from None
            if not isinstance(item, dict) or not {"question", "choices", "answer"} <= item.keys():
                raise ValueError(f"{path} line {number}: an item needs question, choices and answer (index).")
            items.append(item)
    else:
        items = trivia_choices(trivia())
    return items[:limit]
