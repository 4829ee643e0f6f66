"""CLI argument handling and the demo/generate commands' JSON (fast paths; the real pair is loaded once)."""

from __future__ import annotations

import json

import pytest

from conftest import kv_groups_mapped
from iam.cli import build_parser, main

PAIR = ["--llm", "qwen2.5-coder-1.5b", "--slm", "qwen2.5-coder-0.5b"]


def test_bad_layer_list_is_explained(capsys):
    for bad in ("1,a", "1:x", "1:2:3"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "--prompt", "x", "--layers", bad])
        assert "--layers takes comma-separated layers or layer:kv_group units" in capsys.readouterr().err


def test_layer_list_takes_whole_layers_and_kv_groups():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--layers", "3, 20:1,21"])
    assert args.layers == [3, (20, 1), 21]


def test_bad_ratio_is_a_clean_error(capsys):
    assert main(["generate", *PAIR, "--prompt", "hi", "--ratio", "2"]) == 2
    assert "ratio must be a number in [0, 1]" in capsys.readouterr().err


def test_missing_model_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", "--llm", str(tmp_path / "none"), "--slm", "qwen2.5-coder-0.5b", "--prompt", "hi"]) == 2
    assert "neither a model alias" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_json(capsys):
    assert main(["generate", *PAIR, "--prompt", "Name a prime number.", "--chat", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "mapped_layers", "mapping_summary", "kv_cache_bytes", "timings"} <= out.keys()
    assert kv_groups_mapped(out["mapped_layers"]) == 17  # 30% of 28 x 2 KV groups, in the pair's calibrated order
    assert set(out["kv_cache_bytes"]) == {"llm", "slm", "total", "baseline"}
    assert out["mapping_summary"]["mean_similarity"] > 0.5


@pytest.mark.slow
def test_demo_writes_json(tmp_path, capsys):
    path = tmp_path / "sub" / "demo.json"
    assert main(["demo", *PAIR, "--ratios", "0,0.5", "--max-new-tokens", "2", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["provenance"]["argv"].startswith("iam demo --llm ")
    runs = result["runs"]
    assert [kv_groups_mapped(r["mapped_layers"]) for r in runs] == [0, 28]
    assert "IAM, ratio 0.5" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_chat_stream_penalty_and_stop(capsys):
    args = ["generate", *PAIR, "--prompt", "Count from 1 to 20, one number per line.", "--chat", "--max-new-tokens", "40"]
    assert main([*args, "--stream", "--repetition-penalty", "1.2", "--stop", "4"]) == 0
    out = capsys.readouterr().out
    streamed = out.split("\nmapped layers:")[0].strip()
    assert streamed.endswith("4") and "5" not in streamed  # streamed token by token, stopped at the stop string
    assert main([*args, "--json", "--stop", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"].rstrip().endswith("3") and result["timings"]["new_tokens"] < 40


@pytest.mark.slow
def test_eval_harness_side_by_side(tmp_path, capsys):
    args = ["eval", "harness", *PAIR, "--tasks", "iam_trivia_mc", "--limit", "2", "--ratios", "0.5"]
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["ratio"], r["task"], r["metric"]) for r in result["rows"]] == [
        (0.0, "iam_trivia_mc", "acc"),
        (0.5, "iam_trivia_mc", "acc"),
    ]
    assert result["provenance"]["argv"].startswith("iam eval harness")
    assert (tmp_path / "harness.md").read_text().startswith("| ratio | task | metric |")
