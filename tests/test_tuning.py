"""``iam tune``: the SLM learns through the mapped LLM's loss; the LLM never changes; checkpoints resume exactly; the
tuned model loads as an SLM and is refused with another LLM; bad data is named by file and line."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace

import pytest
import torch
from test_cli import user_error

from conftest import char_tokenizer, tiny
from iam import IAMForCausalLM, MappingConfig
from iam.cli import main
from iam.tuning import TuneConfig, load_tuning_data, tune_slm, tuning_data
from iam.tuning import train as train_module
from iam.tuning.data import IGNORE, collate, encode_instruction, json_records

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
MAPPING = MappingConfig(strategy="back", ratio=0.5)


@pytest.fixture
def folders(tmp_path) -> dict[str, str]:
    """The tiny qwen2 pair (and a second LLM) saved as folders with the character tokenizer, and a text file."""
    out = {}
    for name, model in [
        ("llm", tiny("qwen2", 4, 64, 4, 2, seed=0)),
        ("slm", tiny("qwen2", 2, 32, 2, 1, seed=1)),
        ("other", tiny("qwen2", 4, 64, 4, 2, seed=5)),
    ]:
        model.save_pretrained(tmp_path / name)
        char_tokenizer().save_pretrained(tmp_path / name)
        out[name] = str(tmp_path / name)
    (tmp_path / "text.txt").write_text(TEXT)
    out["text"] = str(tmp_path / "text.txt")
    return out


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return load_tuning_data(char_tokenizer(), [str(path)], "lm", 32, 256)


def mapped_loss(llm, slm, batch, ratio: float = 1.0) -> float:
    with torch.no_grad():
        return IAMForCausalLM.from_pair(llm, slm, MappingConfig(ratio=ratio, strategy="back"))(**batch).loss.item()


@pytest.mark.parametrize("method, lr", [("lora", 1e-1), ("full", 1e-2)])
def test_tuning_lowers_the_mapped_loss_and_leaves_the_llm_as_it_was(tmp_path, folders, data, method, lr):
    llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
    before_llm = copy.deepcopy(llm.state_dict())
    flags = [p.requires_grad for p in llm.parameters()]
    batch = collate(data.examples[:4], 0)
    before = mapped_loss(llm, slm, batch)
    config = TuneConfig(
        replace(MAPPING, ratio=1.0), method=method, batch_size=4, grad_accum=1, max_steps=6, lr=lr, warmup_steps=0, save_every=3
    )
    data.examples = data.examples[:4]
    result = tune_slm(llm, slm, char_tokenizer(), data, tmp_path / "run", folders["llm"], config, progress=False)
    assert mapped_loss(llm, slm, batch) < before - 0.02  # a random LLM's loss hardly depends on attention: 0.04 here
    assert all(torch.equal(before_llm[k], v) for k, v in llm.state_dict().items())  # bit for bit
    assert [p.requires_grad for p in llm.parameters()] == flags
    assert result["steps"] == 6 and len(result["rows"]) == 6
    assert (tmp_path / "run" / "tune.png").is_file() and json.loads((tmp_path / "run" / "tune.json").read_text())["steps"] == 6


def test_lora_adapts_only_q_and_k_and_is_merged_into_a_plain_model(tmp_path, folders, data):
    llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
    original = copy.deepcopy(slm.state_dict())
    config = TuneConfig(MAPPING, method="lora", batch_size=2, grad_accum=1, max_steps=2, lr=1e-2, warmup_steps=0)
    result = tune_slm(llm, slm, char_tokenizer(), data, tmp_path / "run", folders["llm"], config, progress=False)
    tuned = type(slm).from_pretrained(result["model"])
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and all(".q_proj." in k or ".k_proj." in k for k in changed), changed
    assert not any("lora" in k for k in tuned.state_dict())


def test_gradient_checkpointing_wraps_the_unmapped_layers_and_gives_the_same_step(tmp_path, folders, data, monkeypatch):
    import transformers.modeling_utils

    checkpoint = transformers.modeling_utils.checkpoint
    losses, runs = [], []
    for checkpointing in (False, True):
        llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
        calls = []
        monkeypatch.setattr(
            transformers.modeling_utils, "checkpoint", lambda *a, _calls=calls, **k: _calls.append(1) or checkpoint(*a, **k)
        )
        mapping = MappingConfig(layers=[0], ratio=0.5)
        config = TuneConfig(mapping, batch_size=2, grad_accum=1, max_steps=3, lr=1e-2, gradient_checkpointing=checkpointing)
        out = tmp_path / f"run{checkpointing}"
        result = tune_slm(llm, slm, char_tokenizer(), data, out, folders["llm"], config, progress=False)
        losses.append([r["loss"] for r in result["rows"]])
        runs.append(len(calls))
        assert not llm.training and not any(getattr(m, "gradient_checkpointing", False) for m in llm.modules())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert runs == [0, 9]  # 3 steps x the 3 unmapped layers


def test_an_interrupted_run_resumes_with_the_next_step_of_an_uninterrupted_one(tmp_path, folders, data, monkeypatch):
    config = TuneConfig(MAPPING, batch_size=2, grad_accum=2, max_steps=5, lr=1e-2, save_every=2)

    def run(out, resume=False):
        llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
        return tune_slm(llm, slm, char_tokenizer(), data, out, folders["llm"], config, resume=resume, progress=False)

    whole = [r["loss"] for r in run(tmp_path / "whole")["rows"]]
    calls = {"n": 0}
    real = train_module.collate

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # the first forward of step 4: step 2's checkpoint is the last
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "collate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000002"]  # intact, no partial left
    monkeypatch.setattr(train_module, "collate", real)
    with pytest.raises(ValueError, match="pass `resume` to continue it, or choose another `out`"):
        run(tmp_path / "cut")
    resumed = [r["loss"] for r in run(tmp_path / "cut", resume=True)["rows"]]
    assert resumed == pytest.approx(whole, rel=1e-6)


def test_resume_refuses_other_settings_but_takes_another_time_limit(tmp_path, folders, data):
    def run(config, resume=False):
        llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
        return tune_slm(llm, slm, char_tokenizer(), data, tmp_path, folders["llm"], config, resume=resume, progress=False)

    run(TuneConfig(MAPPING, max_steps=2, max_minutes=1e-9))  # stops after its first step, out of time
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    with pytest.raises(ValueError, match="other settings"):
        run(TuneConfig(MAPPING, max_steps=3), resume=True)
    assert run(TuneConfig(MAPPING, max_steps=2, save_every=7), resume=True)["steps"] == 2  # a new session, no time limit


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: (c / "trainable.safetensors").write_bytes((c / "trainable.safetensors").read_bytes()[:-40]),
        lambda c: (c / "optimizer.pt").write_bytes(b"garbage"),
        lambda c: (c / "state.json").write_text(json.dumps({"step": 1, "rows": [], "seconds": 0.0})),
        lambda c: (c / "state.json").write_text("{not json"),
    ],
    ids=["truncated weights", "garbage optimizer", "state without settings", "state not json"],
)
def test_a_corrupt_checkpoint_is_refused_naming_it(tmp_path, folders, data, damage):
    def run(config, resume=False):
        llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
        return tune_slm(llm, slm, char_tokenizer(), data, tmp_path, folders["llm"], config, resume=resume, progress=False)

    run(TuneConfig(MAPPING, max_steps=2, max_minutes=1e-9))
    checkpoint = tmp_path / "checkpoints" / "step-000001"
    damage(checkpoint)
    with pytest.raises(ValueError, match=rf"{checkpoint} is not a complete tuning checkpoint .*delete it"):
        run(TuneConfig(MAPPING, max_steps=2), resume=True)


def test_a_file_named_like_a_checkpoint_is_refused_naming_it(tmp_path, folders, data):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-000003").write_text("")
    llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
    with pytest.raises(ValueError, match=r"step-000003 is not a complete tuning checkpoint \(NotADirectoryError"):
        tune_slm(llm, slm, char_tokenizer(), data, tmp_path, folders["llm"], TuneConfig(MAPPING, max_steps=2), resume=True)


def test_the_tuned_slm_serves_its_llm_and_is_refused_with_another(tmp_path, folders, capsys):
    run = tmp_path / "run"
    argv = ["tune", "--llm", folders["llm"], "--slm", folders["slm"], "--data", folders["text"], "--objective", "lm"]
    argv += ["--seq-len", "32", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--strategy", "back"]
    assert main([*argv, "--out", str(run), "--device", "cpu"]) == 0
    record = json.loads((run / "slm" / "iam_tuning.json").read_text())
    assert record["llm"]["name"] == folders["llm"] and record["ratio"] == 0.5 and record["steps"] == 2
    assert record["settings"]["data"]["sources"] == [folders["text"]] and record["provenance"]["argv"].startswith("iam tune")
    capsys.readouterr()
    generate = ["generate", "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu", "--json"]
    assert main([*generate, "--llm", folders["llm"], "--slm", str(run / "slm")]) == 0
    capsys.readouterr()
    error = user_error(capsys, [*generate, "--llm", folders["other"], "--slm", str(run / "slm")])
    assert "tuned through the LLM" in error and "--force" in error
    assert main([*generate, "--llm", folders["other"], "--slm", str(run / "slm"), "--force"]) == 0
    with pytest.raises(ValueError, match="tuned through"):
        IAMForCausalLM.from_pretrained(llm=folders["other"], slm=str(run / "slm"), progress=False)


# ---- data --------------------------------------------------------------------------------------------------------


def write_jsonl(path, records: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


GOOD = {"instruction": "say hi", "input": "", "output": "hi there"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"instruction": "say hi"}, "no output field"),
        ({"output": "hi"}, "no instruction field"),
        ({"instruction": "say hi", "output": "  "}, "response (output) is empty"),
        ({"instruction": "say hi", "output": 3}, "'output' must be a string"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
        ({"instruction": "x" * 300, "output": "y"}, "more than the models' 256 positions"),
    ],
)
def test_bad_records_are_named_by_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_tuning_data(char_tokenizer(), [path], "instruct", 64, 256)
    assert f"{path}:3:" in str(err.value)


def test_a_json_array_names_the_line_where_the_record_starts(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, {"instruction": "x"}], indent=1))
    assert [line for line, _ in json_records(path)] == [2, 7, 12]
    with pytest.raises(ValueError, match=f"{path}:12: the record has no output"):
        load_tuning_data(char_tokenizer(), [str(path)], "instruct", 64, 256)


def test_instruction_examples_score_only_the_response(tmp_path):
    tok = char_tokenizer()
    prompt, response = encode_instruction(tok, GOOD)
    assert tok.decode(prompt) == "user: say hi\nassistant: " and tok.decode(response) == "hi there\n"
    data = load_tuning_data(tok, [write_jsonl(tmp_path / "d.jsonl", [GOOD])], "instruct", 64, 256)
    (example,) = data.examples
    assert tok.decode(example.ids[example.labels != IGNORE]) == "hi there\n"
    assert (example.labels[: len(prompt)] == IGNORE).all()


def test_long_records_are_truncated_and_prompts_that_fill_the_sequence_skipped(tmp_path):
    long = {"instruction": "a", "output": "b" * 100}
    wordy = {"instruction": "c" * 80, "output": "d"}
    data = load_tuning_data(char_tokenizer(), [write_jsonl(tmp_path / "d.jsonl", [GOOD, long, wordy])], "instruct", 64, 256)
    assert (len(data.examples), data.truncated, data.skipped) == (2, 1, 1)
    assert max(len(e.ids) for e in data.examples) == 64


def test_the_objective_must_match_the_data(tmp_path):
    with pytest.raises(ValueError, match="plain text: use `objective` 'lm'"):
        load_tuning_data(char_tokenizer(), ["python-stdlib-train"], "instruct", 64, 256)
    with pytest.raises(ValueError, match="instruction data: use `objective` 'instruct'"):
        load_tuning_data(char_tokenizer(), [write_jsonl(tmp_path / "d.jsonl", [GOOD])], "lm", 64, 256)


def test_the_tuning_modules_are_disjoint_from_evaluation_and_calibration():
    from iam.eval.data import STDLIB_MODULES

    train = set(STDLIB_MODULES["python-stdlib-train"])
    assert not train & set(STDLIB_MODULES["python-stdlib"]) and not train & set(STDLIB_MODULES["python-stdlib-calib"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ratio", "0"], "ratio must be in"),
        (["--method", "full", "--lr", "-1"], "lr must be a positive number"),
        (["--warmup-steps", "-1"], "warmup_steps must be an integer >= 0"),
        (["--slm-cache", "int8"], "int8 would cut the gradient"),
    ],
)
def test_bad_tuning_settings_fail_before_anything_loads(tmp_path, capsys, flags, message):
    argv = ["tune", "--llm", str(tmp_path / "absent"), "--slm", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]
    assert message in user_error(capsys, [*argv, *flags])


def test_bad_data_fails_before_the_weights_load(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("iam.core.checks.load_pair", lambda *a, **k: pytest.fail("weights loaded before the data was checked"))
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "x"}])
    argv = ["tune", "--llm", folders["llm"], "--slm", folders["slm"], "--data", path, "--out", str(tmp_path / "o")]
    assert f"{path}:2: the record has no output" in user_error(capsys, argv)


def test_records_too_short_to_establish_a_mapping_are_skipped_or_refused(tmp_path, folders):
    short = {"instruction": "hi", "output": "yo"}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, short])
    data = load_tuning_data(char_tokenizer(), [path], "instruct", 64, 256, min_tokens=30)  # 33 and 23 tokens
    assert (len(data.examples), data.skipped) == (1, 1)
    data = load_tuning_data(char_tokenizer(), [path], "instruct", 64, 256)
    llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
    mapping = MappingConfig(strategy="back", establish_threshold=30)
    with pytest.raises(ValueError, match="1 examples are shorter than establish_threshold 30"):
        tune_slm(
            llm, slm, char_tokenizer(), data, tmp_path / "o", folders["llm"], TuneConfig(replace(mapping, ratio=0.5), max_steps=1)
        )


def test_held_out_examples_are_not_trained_on_and_their_loss_is_measured_at_each_checkpoint(tmp_path, folders, data, monkeypatch):
    llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 2, 1, seed=1)
    held = collate(data.examples[-2:], 0)
    before = mapped_loss(llm, slm, held, ratio=0.5)
    config = TuneConfig(MAPPING, batch_size=2, grad_accum=1, max_steps=4, lr=1e-2, save_every=2, eval_examples=2)
    held_ids = {id(e) for e in data.examples[-2:]}
    trained: list[int] = []
    real = train_module.collate
    monkeypatch.setattr(
        train_module, "collate", lambda batch, pad: trained.extend(id(e) for e in batch if len(batch) == 2) or real(batch, pad)
    )
    rows = tune_slm(llm, slm, char_tokenizer(), data, tmp_path, folders["llm"], config, progress=False)["rows"]
    assert len(trained) == 8 and not held_ids & set(trained)
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    assert rows[0]["eval_loss"] == pytest.approx(before, rel=1e-5)
    assert rows[-1]["eval_loss"] == pytest.approx(mapped_loss(llm, slm, held, ratio=0.5), rel=1e-5)
    with pytest.raises(ValueError, match="leaves none"):
        tune_slm(llm, slm, char_tokenizer(), data, tmp_path / "x", folders["llm"], replace(config, eval_examples=99))


def test_evaluation_texts_and_empty_limits_are_refused():
    for name in ("wikipedia", "python-docs", "python-stdlib"):
        with pytest.raises(ValueError, match=f"{name} is evaluation text"):
            load_tuning_data(char_tokenizer(), [name], "lm", 64, 256)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_tuning_data(char_tokenizer(), ["python-stdlib-train"], "lm", 64, 256, limit=0)


def test_jsonl_records_may_hold_unicode_line_separators(tmp_path):
    record = {"instruction": "say\u2028hi", "output": "hi\u2029there"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r for _, r in json_records(path)] == [record]


def test_a_sequence_too_short_to_map_is_refused_before_loading(folders, tmp_path, capsys):
    argv = ["tune", "--llm", folders["llm"], "--slm", folders["slm"], "--out", str(tmp_path / "o"), "--seq-len", "10"]
    assert "--seq-len 10 must lie between --establish-threshold 20" in user_error(capsys, argv)


def test_a_tuning_run_is_checked_before_any_weights_load(folders, tmp_path):
    """``tuning_data`` refuses what ``iam tune`` refuses before loading, in the library's words: an int8 SLM cache
    (before the pair is read), a sequence too short to set a mapping or beyond the models' positions."""
    mapping = MappingConfig(ratio=0.5, strategy="back")
    absent = str(tmp_path / "absent")
    with pytest.raises(ValueError, match="int8 would cut the gradient"):
        tuning_data(absent, absent, replace(mapping, slm_cache="int8"), ["python-stdlib-train"], "lm", 64)
    for seq_len in (10, 100_000):
        with pytest.raises(ValueError, match=f"`seq_len` {seq_len} must lie between `establish_threshold` 20"):
            tuning_data(folders["llm"], folders["slm"], mapping, ["python-stdlib-train"], "lm", seq_len)
    data = tuning_data(folders["llm"], folders["slm"], mapping, ["python-stdlib-train"], "lm", 64, limit=3)
    assert len(data.examples) == 3 and all(len(e.ids) <= 64 for e in data.examples)
