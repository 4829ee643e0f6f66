"""Every evaluation command, run through the CLI on the shipped pair with tiny settings: documented JSON keys,
Markdown and PNG files, and values that make sense."""

from __future__ import annotations

import json

import pytest

from conftest import kv_groups_mapped
from iam.cli import main
from iam.eval.data import trivia_choices
from iam.eval.generation import token_f1

pytestmark = pytest.mark.slow

PAIR = ["--llm", "qwen2.5-coder-1.5b", "--slm", "qwen2.5-coder-0.5b"]


def run(tmp_path, capsys, *args: str) -> dict:
    assert main([*args, *PAIR, "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for path in result["files"].values():
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 0
    return result


def test_eval_perplexity(tmp_path, capsys):
    result = run(tmp_path, capsys, "eval", "perplexity", "--windows", "1", "--tokens", "48", "--ratios", "0.5")
    rows = result["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    assert {"ratio", "strategy", "ppl"} <= rows[0].keys()
    assert rows[0]["mapped_layers"] == [] and kv_groups_mapped(rows[1]["mapped_layers"]) == 28  # half of 28 x 2
    assert [r["blend"] for r in rows] == [None, 3]  # the shipped calibration's blend, the default
    assert result["text"] == "wikipedia"


def test_eval_metrics_and_sweep(tmp_path, capsys):
    metrics = run(
        tmp_path, capsys, "eval", "metrics", "--windows", "1", "--tokens", "32", "--ratio", "0.1", "--metrics", "cosine,pearson"
    )
    assert [r["metric"] for r in metrics["rows"]] == ["none (LLM alone)", "cosine", "pearson"]
    sweep = run(tmp_path, capsys, "eval", "sweep", "--windows", "1", "--tokens", "32", "--block", "14")
    assert [r["block"] for r in sweep["rows"]] == ["none", "0-13", "14-27"]
    assert "png" in sweep["files"]


def test_similarity(tmp_path, capsys):
    result = run(tmp_path, capsys, "similarity", "--windows", "1", "--tokens", "40")
    assert len(result["rows"]) == 28 and len(result["heatmap"]) == 28 and len(result["heatmap"][0]) == 24
    assert {"llm_layer", "mean_best_similarity", "best_slm_layer"} <= result["rows"][0].keys()
    assert result["mean"] > 0.8
    assert "png" in result["files"]


def test_similarity_across_families(tmp_path, capsys):
    args = ["similarity", "--llm", "qwen2.5-coder-1.5b", "--slm", "smollm2-135m", "--windows", "1", "--tokens", "60"]
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["rows"]) == 28 and len(result["heatmap"][0]) == 30  # SmolLM2-135M has 30 layers
    assert result["alignment"]["aligned_share_of_llm_tokens"] > 0.7 and 0.5 < result["mean"] < 1
    assert main(["generate", *args[1:5], "--prompt", "hi", "--max-new-tokens", "1"]) == 2  # mapping still refuses
    assert "LLM and SLM are of different families ('qwen2' vs 'llama')" in capsys.readouterr().err


def test_consistency(tmp_path, capsys):
    result = run(
        tmp_path,
        capsys,
        "eval",
        "consistency",
        "--windows",
        "1",
        "--tokens",
        "30",
        "--steps",
        "3",
        "--ratio",
        "0.1",
        "--strategy",
        "back",
    )
    assert [r["llm_layer"] for r in result["rows"]] == [25, 26, 27]
    assert all(0 < r["consistency"] <= 1 for r in result["rows"])


def test_calibrate_writes_an_order_that_auto_uses(tmp_path, capsys, monkeypatch):
    # only the calibration folder moves: pointing IAM_CACHE here would convert both models again (9 GB)
    for module in ("iam.cli.common", "iam.eval.calibrate"):  # where the command line and `iam calibrate` find it
        monkeypatch.setattr(f"{module}.user_calibrations", lambda: str(tmp_path / "calibration"))
    args = ["--method", "greedy", "--windows", "1", "--tokens", "24", "--steps", "2", "--shortlist", "1"]
    result = run(tmp_path, capsys, "calibrate", *args)
    assert [r["step"] for r in result["rows"]] == [1, 2] and [r["measured"] for r in result["rows"]] == [28, 1]
    assert 0 < result["rows"][0]["damage"] <= result["rows"][1]["damage"]
    assert sorted(result["order"]) == list(range(28)) and result["order"][:2] == [r["layer"] for r in result["rows"]]
    stored = json.loads((tmp_path / "calibration" / result["calibration_file"].split("/")[-1]).read_text())
    assert stored["order"] == result["order"] and stored["source"]["method"] == "greedy"
    assert stored["blend"] == 3  # measured under the stored default blend, and stored with the order
    # the user's calibration now takes precedence over the shipped order
    assert main(["generate", *PAIR, "--prompt", "x " * 30, "--max-new-tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mapped_layers"] == sorted(result["order"][:8])


def test_calibrate_rejects_a_bad_step_count_before_measuring(tmp_path, capsys):
    for steps in ("0", "29"):
        args = ["calibrate", *PAIR, "--method", "greedy", "--steps", steps, "--windows", "1", "--tokens", "24"]
        assert main([*args, "--to", str(tmp_path), "--out", str(tmp_path)]) == 2
        assert "need 1 <= steps <= 28" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_qa_and_choice(tmp_path, capsys):
    qa = run(tmp_path, capsys, "eval", "qa", "--limit", "4", "--ratios", "0.3", "--max-new-tokens", "8")
    assert [r["ratio"] for r in qa["rows"]] == [0.0, 0.3]
    assert {"f1", "exact_match", "n"} <= qa["rows"][0].keys() and qa["rows"][0]["f1"] > 0
    choice = run(tmp_path, capsys, "eval", "choice", "--limit", "4", "--ratios", "0.3")
    assert {"accuracy", "n", "ratio"} <= choice["rows"][1].keys() and choice["rows"][0]["n"] == 4


def test_choice_rejects_malformed_jsonl(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"]}\n')
    assert main(["eval", "choice", *PAIR, "--dataset", str(bad), "--out", str(tmp_path)]) == 2
    assert "line 1: an item needs question, choices and answer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "pred, gold, f1", [("Richard Nixon", "Richard Nixon", 1.0), ("It was Nixon.", "Richard Nixon", 0.4), ("1964", "1963", 0.0)]
)
def test_token_f1(pred, gold, f1):
    assert token_f1(pred, gold) == pytest.approx(f1)


def test_trivia_choices_hold_the_answer():
    items = trivia_choices([("q1", "a"), ("q2", "b"), ("q3", "c"), ("q4", "d"), ("q5", "e")])
    assert all(item["choices"][item["answer"]] == a for item, a in zip(items, "abcde"))
    assert all(len(set(item["choices"])) == 4 for item in items)


@pytest.mark.parametrize("command", ["qa", "choice", "harness"])
def test_an_empty_limit_is_refused_by_the_parser(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", command, "--limit", "0"])
    assert exit_.value.code == 2 and "whole number of at least 1" in capsys.readouterr().err
