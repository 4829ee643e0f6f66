"""Offline evaluation data is real and clean; online data sets say what to install."""

from __future__ import annotations

import sys

import pytest

from iam.eval.data import load_qa, load_text, wikipedia_articles


def test_wikipedia_articles_are_clean_prose():
    articles = wikipedia_articles()
    assert len(articles) > 100
    assert articles[0].startswith("Anarchism is a political philosophy")
    assert not any("#REDIRECT" in a or "'''" in a for a in articles)


def test_calibration_and_evaluation_code_texts_are_disjoint():
    assert "class ArgumentParser" in load_text("python-stdlib")
    assert "class ArgumentParser" not in load_text("python-stdlib-calib")
    assert "def getLogger" in load_text("python-stdlib-calib")


def test_python_docs_is_the_language_reference():
    text = load_text("python-docs")
    assert len(text) > 100_000 and 'The "assert" statement' in text
    assert "def getLogger" not in text and "class ArgumentParser" not in text  # no calibration or evaluation source


def test_trivia_pairs():
    pairs = load_qa("trivia")
    assert len(pairs) > 100 and all(q and a for q, a in pairs)


@pytest.mark.parametrize("name", ["wikitext2", "govreport"])
def test_online_text_without_datasets_says_what_to_install(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(FileNotFoundError, match=rf"--dataset {name} needs the datasets package: pip install 'iam-llm\[online\]'"):
        load_text(name)


def test_unknown_names_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found .or use one of wikipedia"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown QA data set 'squad'; use one of trivia, hotpotqa, alpaca"):
        load_qa("squad")
