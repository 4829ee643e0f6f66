"""CLI argument handling and the demo/generate commands' JSON (fast paths; the real pair is loaded once)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, kv_groups_mapped, tiny
from iam import MappingConfig
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", *PAIR, "--prompt", "hi", "--ratio", "2"], "--ratio must be a number in [0, 1]"),
        (["generate", *PAIR, "--prompt", "hi", "--local-sinks", "4"], "--local-sinks=4 would not be used"),
        (["generate", *PAIR, "--prompt", "hi", "--blend", "9"], "--blend must be at most 8"),
        (["generate", *PAIR, "--prompt", "hi", "--budget", "0.5"], "a budget needs an eviction policy: set --eviction to one of"),
    ],
)
def test_an_invalid_value_is_named_by_its_flag(argv, message, capsys):
    """The library names the parameter in a field (``ConfigError.param``), and the command line names it by its flag;
    the library's own message keeps the parameter's name."""
    assert main(argv) == 2
    assert f"iam: error: {message}" in capsys.readouterr().err


def test_a_config_error_names_its_parameter_in_a_field():
    from iam.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^local_sinks=4 would not be used") as caught:
        MappingConfig(local_sinks=4)
    assert caught.value.param == "local_sinks" and caught.value.naming("--local-sinks").startswith("--local-sinks=4 would")


def test_local_window_flags_are_checked_before_loading(capsys):
    assert main(["generate", *PAIR, "--prompt", "hi", "--local-sinks", "4"]) == 2
    assert "needs local_window > 0" in capsys.readouterr().err
    assert main(["bench", "--analytic", "--local-window", "64"]) == 2
    assert "--analytic does not model --local-window" in capsys.readouterr().err
    assert main(["eval", "kv-tradeoff", *PAIR, "--local-windows", "64,-8"]) == 2
    assert "--local-window must be an integer >= 0 (recent tokens attended exactly), got -8" in capsys.readouterr().err
    assert main(["eval", "kv-tradeoff", *PAIR, "--local-window", "8"]) == 2
    assert "takes --local-windows" in capsys.readouterr().err
    assert main(["eval", "perplexity", *PAIR, "--local-window", "8", "--eviction", "h2o", "--budget", "19"]) == 2
    assert "smaller than the 20 tokens the policy and the exact local window" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["eval", "perplexity", "--tokens", "15", "--ratios", "0.5"],
            "a --tokens window of 15 tokens is below establish_threshold 20",
        ),
        (["eval", "perplexity", "--tokens", "1", "--ratios", "0"], "--tokens 1: a window needs at least 2 tokens"),
        (["eval", "sweep", "--tokens", "12"], "a --tokens window of 12 tokens is below establish_threshold 20"),
        (["eval", "metrics", "--ratio", "0"], "--ratio 0.0 maps nothing: iam eval metrics measures mapped layers"),
        (["eval", "consistency", "--ratio", "0"], "--ratio 0.0 maps nothing: iam eval consistency"),
        (["similarity", "--tokens", "1"], "a --tokens window of 1 tokens is below establish_threshold 20"),
        (["calibrate", "--tokens", "8"], "a --tokens window of 8 tokens is below establish_threshold 20"),
        (["bench", "--prompt", "12", "--ratios", "0.5"], "a --prompt of 12 tokens is below establish_threshold 20"),
        (["bench", "--memory-scaling", "--tokens", "64,16"], "a --tokens length of 16 tokens is below establish_threshold 20"),
    ],
)
def test_an_evaluation_that_would_label_the_llm_alone_as_iam_is_refused_before_loading(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("iam.cli.common.load_checked", lambda *a, **k: pytest.fail("models were loaded"))
    assert main([*argv, *PAIR]) == 2
    assert message in capsys.readouterr().err


def test_evaluations_refuse_inputs_below_the_threshold_in_python(pair):
    """Every evaluation refuses inputs on which IAM would map nothing, before running any model."""
    from iam import MappingConfig
    from iam.eval import analysis, generation
    from iam.eval.perplexity import eval_perplexity
    from iam.eval.sweep import eval_sweep

    llm, slm = pair
    tok = char_tokenizer()
    base = MappingConfig(establish_threshold=200)
    message = r"below establish_threshold 200: IAM would map nothing on it"
    windows = [torch.randint(1, 97, (1, 40))]
    with pytest.raises(ValueError, match=rf"a window of 40 tokens is {message}"):
        eval_perplexity(llm, slm, windows, [0.5], base, progress=False)
    with pytest.raises(ValueError, match=rf"a window of 40 tokens is {message}"):
        eval_sweep(llm, slm, windows, 2, base, progress=False)
    with pytest.raises(ValueError, match=r"a window of 1 token has nothing to score"):
        eval_perplexity(llm, slm, [windows[0][:, :1]], [0.0], base, progress=False)
    items = [{"question": "2 + 2?", "choices": ["4", "5"], "answer": 0}]
    with pytest.raises(ValueError, match=rf"a question with an option of \d+ tokens is {message}"):
        generation.eval_choice(llm, slm, tok, items, [0.5], base, progress=False)
    with pytest.raises(ValueError, match=rf"a prompt of \d+ tokens is {message}"):
        generation.eval_qa(llm, slm, tok, [("2 + 2?", "4")], [0.5], base, progress=False)
    with pytest.raises(ValueError, match=r"`ratio` 0 maps nothing"):
        analysis.eval_consistency(llm, slm, tok, windows, 0, 4, base, progress=False)
    # a question too short to set a mapping is skipped, for every row alike, and counted
    items.append({"question": "What is the sum of two and two, in words?", "choices": ["four", "five"], "answer": 0})
    result = generation.eval_choice(llm, slm, tok, items, [0.5], MappingConfig(establish_threshold=40), progress=False)
    assert [r["n"] for r in result["rows"]] == [1, 1] and result["skipped"] == {"shorter than establish_threshold": 1}
    assert eval_perplexity(llm, slm, windows, [0.0], base, progress=False)["rows"][0]["mapped_layers"] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "perplexity", "--windows", "0"],
        ["eval", "perplexity", "--windows", "-1"],
        ["eval", "perplexity", "--tokens", "-5"],
        ["demo", "--ratios", ","],
        ["eval", "sweep", "--block", "0"],
        ["eval", "sweep", "--block", "-2"],
        ["eval", "consistency", "--steps", "0"],
    ],
)
def test_counts_below_one_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and "takes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratios", "0,2"], r"--ratios must lie in \[0, 1\] \(fractions of the LLM's layers mapped\), got \[2.0\]"),
        (["--ratios", "-0.5"], r"--ratios must lie in \[0, 1\]"),
        (["--bytes", "0"], r"argument --bytes: takes a whole number of at least 1; got '0'"),
        (["--bytes", "-2"], r"argument --bytes: takes a whole number of at least 1"),
        (["--memory-budget", "-1"], r"argument --memory-budget: takes a number above 0; got '-1'"),
        (["--memory-budget", "nan"], r"argument --memory-budget: takes a number above 0"),
        (["--prompt", "-3"], r"argument --prompt: takes a whole number of at least 1"),
        (["--eviction", "h2o", "--budget", "-0.5"], r"budget must be a fraction in \(0, 1\]"),
        (["--projection", "--tokens", "0"], r"argument --tokens: takes comma-separated whole numbers of at least 1"),
        (["--projection", "--repeats", "0"], r"argument --repeats: takes a whole number of at least 1"),
    ],
)
def test_bench_checks_every_numeric_flag(argv, message, capsys):
    """--analytic and --projection validated nothing: 160 mapped layers of an 80-layer model, negative or NaN
    figures, internal errors for --bytes 0 and --tokens 0."""
    argv = ["bench", "--analytic", *argv] if "--projection" not in argv else ["bench", *argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # a flag argparse refuses
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("iam: error: ")


def test_a_parser_error_is_one_line_with_a_hint_to_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "perplexity", "--windows", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "iam: error: argument --windows: takes a whole number of at least 1; got '0' (see 'iam eval perplexity --help')\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "perplexity", "--out", "{file}"],
        ["similarity", "--out", "{file}/sub"],
        ["tune", "--out", "{file}"],
        ["calibrate", "--to", "{file}"],
        ["demo", "--json", "{file}/demo.json"],
    ],
)
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(argv, tmp_path, capsys, monkeypatch):
    """It failed only after the whole evaluation (or the first tuning checkpoint), losing the results."""
    monkeypatch.setattr("iam.cli.common.load_checked", lambda *a, **k: pytest.fail("models were loaded"))
    for module in ("iam.tuning.data", "iam.cli.evaluate"):
        monkeypatch.setattr(f"{module}.read_configs", lambda *a, **k: pytest.fail("configs were read"))
    file = tmp_path / "a-file"
    file.write_text("")
    argv = [a.format(file=file) for a in argv]
    assert main([*argv, *PAIR]) == 2
    err = capsys.readouterr().err
    assert re.search(r"iam: error: --(out|to|json) .*a-file.* is not a writable folder \(.*\); nothing was run", err), err


def test_an_output_file_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """It gave an internal error after the run."""
    monkeypatch.setattr("iam.cli.common.load_checked", lambda *a, **k: pytest.fail("models were loaded"))
    assert main(["demo", *PAIR, "--json", str(tmp_path)]) == 2
    assert f"iam: error: --json {tmp_path} is a folder: give a file name" in capsys.readouterr().err


def test_files_that_are_not_utf8_or_not_json_are_named(tmp_path, pair_folders, capsys):
    from iam.eval import data
    from iam.tuning.data import json_records

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin} is not UTF-8 text \(byte 3: invalid continuation byte\)"):
        data.load_text(str(latin))
    with pytest.raises(ValueError, match=rf"{latin} is not UTF-8 text"):
        list(json_records(latin))
    items = tmp_path / "items.jsonl"
    items.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n\n{not json\n')
    with pytest.raises(ValueError, match=rf"{items} line 3: not valid JSON"):
        data.load_items(str(items), 5)
    items.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{items} line 1: an item needs question, choices and answer"):
        data.load_items(str(items), 5)
    garbage = tmp_path / "config.json"
    garbage.write_text("{garbage")
    assert re.search(
        rf"{garbage} is not a model's config.json", user_error(capsys, ["bench", "--analytic", "--llm", str(garbage)])
    )
    (Path(pair_folders[0]) / "config.json").write_text("{garbage")
    line = user_error(capsys, generate(*pair_folders))
    assert f"{Path(pair_folders[0]) / 'config.json'} is not a readable model config" in line


def test_missing_model_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", "--llm", str(tmp_path / "none"), "--slm", "qwen2.5-coder-0.5b", "--prompt", "hi"]) == 2
    assert "neither a model alias" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_json(capsys):
    assert main(["generate", *PAIR, "--prompt", "Name a prime number.", "--chat", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "mapped_layers", "mapping_summary", "kv_cache_bytes", "timings"} <= out.keys()
    assert kv_groups_mapped(out["mapped_layers"]) == 17  # 30% of 28 x 2 KV groups, in the pair's calibrated order
    assert set(out["kv_cache_bytes"]) == {"llm", "slm", "total", "baseline", "slm_baseline"}
    assert out["mapping_summary"]["mean_similarity"] > 0.5


@pytest.mark.slow
def test_demo_writes_json(tmp_path, capsys):
    path = tmp_path / "sub" / "demo.json"
    argv = ["demo", *PAIR, "--ratios", "0,0.5", "--max-new-tokens", "2", "--json", str(path)]
    assert main([*argv, "--retrieval", "llm,iam0.5+w16", "--retrieval-tokens", "300"]) == 0
    result = json.loads(path.read_text())
    assert [r["method"] for r in result["retrieval"]] == ["llm", "iam0.5+w16"]
    assert result["retrieval"][0]["llm_kv_dropped"] == 0 < result["retrieval"][1]["llm_kv_dropped"]
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


# every user error is one line and exit code 2; an internal error keeps its traceback -------------------------------


def generate(llm: str, slm: str, *extra: str) -> list[str]:
    return ["generate", "--llm", llm, "--slm", slm, "--prompt", "hello there", "--max-new-tokens", "2", *extra]


def user_error(capsys, argv: list[str]) -> str:
    """Run ``iam argv``, expecting a user error: exit code 2, no traceback, and a last line ``iam: error: ...`` on
    stderr (after any progress bars); return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("iam: error: "), err
    return err.strip().splitlines()[-1]


def test_the_tiny_pair_folders_generate(pair_folders, capsys):
    assert main(generate(*pair_folders, "--json", "--device", "cpu")) == 0
    assert json.loads(capsys.readouterr().out)["timings"]["new_tokens"] == 2


def test_a_truncated_safetensors_file_is_named(pair_folders, capsys):
    weights = Path(pair_folders[1]) / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    assert f"{weights} is not a readable safetensors file, truncated or corrupt" in user_error(capsys, generate(*pair_folders))


def test_saving_the_wrapper_is_refused_and_a_folder_of_other_weights_is_refused(pair_folders, tmp_path, capsys):
    """``save_pretrained`` wrote ``llm.*``/``slm.*`` weights under the LLM's config: a folder that loaded as a random
    LLM. Saving is refused, and a folder whose weights do not cover its model is refused on load."""
    from safetensors.torch import save_file

    from iam import IAMForCausalLM

    llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
    with pytest.raises(ValueError, match=r"cannot be saved as one folder .*save model.llm and model.slm"):
        IAMForCausalLM(llm, slm).save_pretrained(tmp_path / "iam")
    assert not (tmp_path / "iam").exists()
    weights = {f"llm.{k}": v.contiguous() for k, v in llm.state_dict().items()}
    save_file(weights, str(Path(pair_folders[0]) / "model.safetensors"), metadata={"format": "pt"})
    line = user_error(capsys, generate(*pair_folders))
    assert f"the weights in {pair_folders[0]} do not cover its model: " in line and "tensors are missing (lm_head.weight" in line


def test_a_folder_without_a_tokenizer_is_named(pair_folders, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (Path(pair_folders[1]) / name).unlink()
    assert f"{pair_folders[1]} has no tokenizer" in user_error(capsys, generate(*pair_folders))


def test_a_file_that_is_not_gguf(pair_folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IAM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(96))
    assert f"{bad} is not a readable GGUF file" in user_error(capsys, generate(pair_folders[0], str(bad)))
    assert [p.name for p in (tmp_path / "cache").iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", r"unknown device 'bogus'"),
        pytest.param(
            "cuda",
            r"device 'cuda' is not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
        ("cpu:x", r"unknown device 'cpu:x'"),
    ],
)
def test_a_device_that_is_not_there(pair_folders, capsys, device, message):
    assert re.search(message, user_error(capsys, generate(*pair_folders, "--device", device)))


def test_a_blend_above_the_slm_head_count(pair_folders, capsys):
    assert "blend 8 exceeds the SLM's 4 heads" in user_error(capsys, generate(*pair_folders, "--blend", "8"))


def test_an_internal_error_keeps_its_traceback_and_asks_for_a_report(pair_folders, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("iam.cli.generate.run_generation", broken)
    assert main(generate(*pair_folders)) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: a bug" in err
    assert err.rstrip().endswith("iam: internal error; please report it with the traceback above")


def test_library_errors_name_parameters_and_the_cli_names_flags(capsys, monkeypatch):
    """The library names its parameters (`min_tokens`); a user of the command line reads the flag (--min-tokens)."""

    def refuse(*a, **k):
        raise ValueError("need 0 < `min_tokens` 300 <= `context` 200; `nothing` else")

    monkeypatch.setattr("iam.cli.common.load_checked", refuse)
    assert main(["eval", "summarize", *PAIR, "--context", "200", "--min-tokens", "300"]) == 2
    assert capsys.readouterr().err == "iam: error: need 0 < --min-tokens 300 <= --context 200; nothing else\n"


@pytest.mark.parametrize(
    "argv, message",
    [  # every row mapped --layers, the LLM alone's included; --llm-cache and --local-window vanished beside --configs
        (["bench", "--configs", "llm,iam0.5", "--layers", "1"], r"--layers \[1\] would map those layers in every configuration"),
        (["bench", "--ratios", "0.5", "--layers", "1"], r"--layers \[1\] would map those layers in every configuration"),
        (["eval", "retrieval", "--configs", "iam0.5", "--layers", "1"], r"--layers \[1\] would map those layers"),
        (["eval", "retrieval", "--llm-cache", "int8"], "--llm-cache 'int8' would apply beside the configurations"),
        (["eval", "retrieval", "--local-window", "8"], "--local-window 8 would apply beside the configurations"),
        (["bench", "--configs", "iam0.5+w8", "--local-window", "8"], "--local-window 8 would apply beside"),
        (["demo", "--local-window", "8"], "--local-window 8 would apply beside the configurations"),
        (["bench", "--ratios", "0.5", "--llm-cache", "int8"], r"\['iam0.5\+int8'\] are not measured against one"),
        (["bench", "--configs", ""], "give at least one configuration"),
        (["eval", "retrieval", "--configs", "llm,iam0.5", "--local-sinks", "2"], "--local-sinks 2 would not be used"),
    ],
)
def test_a_base_flag_never_overrides_or_vanishes_beside_configurations(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("iam.cli.common.load_checked", lambda *a, **k: pytest.fail("models were loaded"))
    assert main([*argv, *PAIR]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_local_sinks_go_to_the_configurations_with_a_window(monkeypatch):
    """--local-sinks with windowed --configs always failed: the implied llm row has no window."""
    loaded = []

    def stop(llm, slm, configs, *args, **kwargs):
        loaded.extend(configs)
        raise FileNotFoundError("stop")

    monkeypatch.setattr("iam.cli.common.load_checked", stop)
    assert main(["bench", "--configs", "iam0.5+w8,iam0.3", "--local-sinks", "2", *PAIR]) == 2
    assert [(c.ratio, c.local_window, c.local_sinks) for c in loaded] == [(0.5, 8, 2), (0.3, 0, None)]
