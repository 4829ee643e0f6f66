"""Long-context retrieval (``iam eval retrieval``), ``generate()`` over a prefilled cache, and eviction that spares
the mapped layers (``scope="unmapped"``), on tiny random pairs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, forward, left_pad, prompt, save_tiny_pair, tiny
from iam import IAMForCausalLM, MappingConfig
from iam.cli import main
from iam.core.eviction import H2O, POLICIES, SnapKV, StreamingLLM
from iam.eval import retrieval
from iam.eval.setup import Setup, configured, parse_setup, parse_setups
from iam.eval.tradeoff import kv_shares

UNITS = [1, 3]  # whole layers mapped; 0 and 2 keep K and V


# ---- the generator ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(retrieval.TASKS))
def test_samples_are_deterministic_and_hold_each_answer_once(task):
    tok = char_tokenizer()
    samples = retrieval.make_samples(tok, task, 3, 700, seed=4, filler="prose")
    assert samples == retrieval.make_samples(tok, task, 3, 700, seed=4, filler="prose")
    assert samples != retrieval.make_samples(tok, task, 3, 700, seed=5, filler="prose")
    for sample in samples:
        assert 500 < sample.tokens <= 700 and sample.tokens == len(tok(sample.context).input_ids)
        for question in sample.questions:
            for answer in question.answers:
                # in its needle only: the pass key's needle says it twice, and a variable's name recurs in the next
                # link of the chain (VAR B = VAR A)
                count = sample.context.count(answer)
                once = 2 if task == "passkey" else 1
                assert count == once or (task == "vartrack" and count == 2 and answer != question.answers[-1])


@pytest.mark.parametrize("task", sorted(retrieval.TASKS))
@pytest.mark.parametrize("tokens", [300, 420, 700])
def test_every_context_fills_the_length_asked_with_every_question_or_is_refused(task, tokens):
    """kv at small lengths gave contexts far from the length asked, with fewer questions, reported under it."""
    asked = {"multikey": 4, "kv": 4}.get(task, 1)
    try:
        samples = retrieval.make_samples(char_tokenizer(), task, 4, tokens, seed=3)
    except ValueError as err:
        assert re.search(r"too short for task kv|leaves no room|fills only", str(err)), err
        return
    for sample in samples:
        assert (1 - retrieval.LENGTH_TOLERANCE) * tokens <= sample.tokens <= tokens
        assert len({q.text for q in sample.questions}) == len(sample.questions) == asked


def test_needles_sit_at_the_asked_depths():
    tok = char_tokenizer()
    for spread in ("even", "random"):
        for sample in retrieval.make_samples(tok, "multikey", 4, 900, seed=1, spread=spread, filler="code"):
            for question in sample.questions:
                code = question.answers[0]
                at = len(tok(sample.context[: sample.context.index(code)]).input_ids) / sample.tokens
                assert abs(at - question.depth) < 0.1  # the depth is the needle's start, the code ends it
    even = [q.depth for s in retrieval.make_samples(tok, "passkey", 20, 600, spread="even") for q in s.questions]
    assert min(even) < 0.3 and max(even) > 0.7


@pytest.mark.parametrize(
    "text, message",
    [
        ("iam0.5+q3", "part 'q3': unknown part"),
        ("llm+lru@0.5", "eviction policy must be one of"),
        ("llm+w64", "a local window needs mapped layers"),
        ("iamx", "could not convert"),
        # a repeated or contradictory part ran the last one, or the LLM alone under an IAM label
        ("iam0.5+w64+w32", "part 'w32': a second window part after 'w64'"),
        ("iam0.5+llm", "part 'llm': a second mapping part after 'iam0.5'"),
        ("llm+iam0.5", "part 'iam0.5': a second mapping part after 'llm'"),
        ("iam0.5+h2o@0.5+snapkv@0.5", "part 'snapkv@0.5': a second eviction part after 'h2o@0.5'"),
        ("iam0.5+int8+int8", "part 'int8': a second cache part after 'int8'"),
        ("iam0+h2o@0.5", r"part 'iam0': iam<ratio> takes a ratio in \(0, 1\]"),
        ("iam1.5", r"part 'iam1.5': iam<ratio> takes a ratio in \(0, 1\]"),
        ("iam0.5+w0", "part 'w0': a window of 0 tokens is no window"),
        ("iam0.5+b0", r"part 'b0': b<blend> takes 1 to 8 SLM heads"),
        ("iam0.5+b9", r"part 'b9': b<blend> takes 1 to 8 SLM heads"),
        ("iam0.5+b1+b2", "part 'b2': a second blend part after 'b1'"),
        ("llm+b2", "'llm\\+b2': a blend needs mapped layers"),
        ("iam0.5+h2o@0.5:some", "part 'h2o@0.5:some': scope must be one of"),
    ],
)
def test_bad_configurations_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_setup(text)


def test_a_configuration_given_twice_is_refused():
    with pytest.raises(ValueError, match=r"configurations \['iam0.5'\] are given more than once"):
        parse_setups("iam0.5,h2o@0.5,iam0.5")


def test_configurations_parse_and_the_llm_alone_comes_first():
    setups = parse_setups("iam0.5+w64+h2o@0.5:unmapped,snapkv@0.7")
    assert [s.label for s in setups] == ["llm", "iam0.5+w64+h2o@0.5:unmapped", "snapkv@0.7"]
    assert setups[1] == Setup(0.5, 64, "h2o", 0.5, "unmapped")
    assert setups[1].label == Setup(0.5, 64, "h2o", 0.5, "unmapped").label == "iam0.5+w64+h2o@0.5:unmapped"
    assert setups[2].ratio == 0 and setups[2].budget == 0.7


def test_a_label_derived_from_values_parses_back_to_them():
    setups = [Setup(), Setup(0.3), Setup(0.5, 64, "streaming", 0.5, "unmapped", "int8", "int8")]
    setups += [Setup(policy="kvzip", budget=256, llm_cache="int4"), Setup(policy="draft-kvzip", budget=0.5, slm_cache="int4")]
    setups += [Setup(0.5, 64, blend=1), Setup(0.3, blend=2, llm_cache="int8")]
    for setup in setups:
        assert parse_setup(setup.label) == setup and parse_setup(setup.label).label == setup.label
    with pytest.raises(ValueError, match="'llm\\+w64': a local window needs mapped layers"):
        Setup(local_window=64)


def test_a_blend_part_sets_its_configuration_and_the_base_blend_serves_the_others():
    one, other = parse_setups("iam0.5+w64+b1,iam0.5+w64")[1:]
    assert (one.blend, one.label, other.blend) == (1, "iam0.5+w64+b1", None)
    assert configured(MappingConfig(), one).blend == 1 and configured(MappingConfig(), other).blend is None
    assert configured(MappingConfig(blend=2), other).blend == 2  # --blend for every configuration that gives none
    with pytest.raises(ValueError, match="`blend` 2 would apply beside the configurations"):
        configured(MappingConfig(blend=2), one)


def test_a_near_miss_is_one_character_off():
    assert retrieval.near_miss("The code is 9448229.", ["9438429"]) is False  # two places
    assert retrieval.near_miss("The code is 9438420.", ["9438429"]) is True
    assert retrieval.near_miss("88559", ["8850189"]) is False  # shorter: digits lost, not one wrong
    assert retrieval.near_miss("AB CD", ["AB", "CD"]) is False  # several answers: not a single copy


def test_a_wrong_needle_is_another_value_of_the_context():
    context = "The access code for the red door is 1234567. The access code for the blue door is 7654321."
    assert retrieval.copied_wrong("7654321.", ["1234567"], context) is True
    assert retrieval.copied_wrong("7654320.", ["1234567"], context) is False  # not in the context
    assert retrieval.copied_wrong("1234567", ["1234567", "7654321"], context) is False  # several answers


def test_the_frontier_is_by_kv_dropped_and_accuracy_per_task_and_length_on_each_axis():
    def row(task, dropped, accuracy, total):  # IAM's SLM costs total KV here: the second row is behind on that axis
        return {
            "task": task,
            "tokens": 1024,
            "llm_kv_dropped": dropped,
            "accuracy": accuracy,
            "total_kv_dropped": total,
            "total_kv_dropped_at_72b": dropped,
        }

    rows = [row("a", 0.0, 1.0, 0.0), row("a", 0.5, 1.0, 0.1), row("a", 0.3, 0.7, 0.3), row("a", 0.7, 0.2, 0.7)]
    rows.append(row("b", 0.3, 0.7, 0.3))
    retrieval.frontier(rows)
    assert [r["on_frontier"] for r in rows] == [False, True, False, True, True]
    assert [r["on_total_frontier"] for r in rows] == [False, True, True, True, True]
    assert [r["on_72b_frontier"] for r in rows] == [r["on_frontier"] for r in rows]


def test_kv_shares_project_the_total_to_the_papers_pair():
    kv = {"llm": 40, "slm": 30, "total": 70, "baseline": 100, "slm_baseline": 60}
    shares = kv_shares(kv)
    assert shares["llm_kv_dropped"] == pytest.approx(0.6) and shares["total_kv"] == pytest.approx(0.7)
    # Qwen2-0.5B's full cache is 24 x 2 x 64 / (80 x 8 x 128) = 3.75% of Qwen2-72B's per token
    assert shares["total_kv_dropped_at_72b"] == pytest.approx(1 - (0.4 + 0.5 * 0.0375))


def test_wilson_interval():
    low, high = retrieval.wilson(45, 50)
    assert 0.78 < low < 0.79 and 0.95 < high < 0.96  # the textbook values for 90% of 50
    assert retrieval.wilson(0, 10)[0] == 0 and retrieval.wilson(10, 10)[1] == 1


# ---- protocols and generate() over a prefilled cache --------------------------------------------------------------


def test_the_agnostic_protocol_compresses_before_the_question(pair):
    """SnapKV evicts once, after the first prefill: under ``agnostic`` that is the context alone, so the slots kept are
    those a prefill of the context alone keeps; under ``aware`` the question's tokens decide them."""
    llm, slm = pair
    for model in pair:
        model.config.max_position_embeddings = 1024
    tok = char_tokenizer()
    sample = retrieval.make_samples(tok, "passkey", 1, 400, seed=2, filler="code")[0]
    model = IAMForCausalLM.from_pair(llm, slm, MappingConfig(ratio=0.0), SnapKV(budget=0.5, window=4))
    context, question = retrieval.encode(tok, sample, sample.questions[0])
    alone = model.new_cache()
    forward(model, context, cache=alone)
    kept_alone = alone.kept.positions

    caches = {}
    original = model.generate

    def spy(*args, **kwargs):
        caches[protocol] = kwargs["cache"]
        return original(*args, **kwargs)

    model.generate = spy
    for protocol in retrieval.PROTOCOLS:
        retrieval.answer(model, tok, sample, protocol, max_new_tokens=3)
    n = context.shape[1]
    agnostic, aware = (caches[p].kept.positions for p in retrieval.PROTOCOLS)
    assert torch.equal(agnostic[:, : kept_alone.shape[1]], kept_alone)  # then the question and answer, appended
    assert int(agnostic[:, : kept_alone.shape[1]].max()) < n  # no question token took part
    assert int((aware >= n).sum()) >= 4  # the observation window is the question's end
    assert not torch.equal(aware[aware < n], kept_alone[0])


@pytest.mark.parametrize("policy", [None, H2O(budget=0.7, recent=4), StreamingLLM(budget=0.6, sinks=2)])
@pytest.mark.parametrize("window", [0, 8])
def test_generate_continues_a_prefilled_cache(pair, policy, window):
    """``generate(full_ids, cache=prefilled)`` feeds only the new tokens: without eviction it is the unsplit run; with
    eviction it is the same split stepped by hand (the prefix evicted before the rest arrives)."""
    llm, slm = pair
    if window and policy is not None:
        policy = type(policy)(**{**policy.__dict__, "scope": "unmapped"})
    model = IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=UNITS, local_window=window), policy)
    ids = prompt(70, seed=3)
    cache = model.new_cache()
    forward(model, ids[:, :50], cache=cache)
    kept = copy.deepcopy(cache)
    split = model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(split, model.generate(ids, cache=kept, max_new_tokens=8, do_sample=False))  # a copy serves again
    if policy is None:
        assert torch.equal(split, model.generate(ids, max_new_tokens=8, do_sample=False))
    by_hand = model.new_cache()
    forward(model, ids[:, :50], cache=by_hand)
    tokens = ids
    logits = forward(model, ids[:, 50:], cache=by_hand).logits
    for _ in range(8):
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], -1)
        logits = forward(model, tokens[:, -1:], cache=by_hand).logits
    assert torch.equal(split, tokens)


# ---- eviction that spares the mapped layers -----------------------------------------------------------------------


def unmapped(policy: type, budget: float = 0.5):
    return policy(budget=budget, scope="unmapped")


@pytest.mark.parametrize("policy", [H2O, StreamingLLM, SnapKV])
@pytest.mark.parametrize("window", [0, 8])
def test_unmapped_scope_evicts_only_where_k_and_v_are_kept(pair, policy, window):
    """Exact bytes: the evicted layers hold the budget, the mapped layers' V and the SLM hold every token (so no
    mapped head reads a V that is gone), and a local window's keys are the sinks and the window."""
    llm, slm = pair
    model = IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=UNITS, local_window=window), unmapped(policy))
    ids = prompt(64, seed=1)
    cache = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True).cache
    seen = 64 + 3  # the last token is not fed back
    keep = 32 + 3 if policy is SnapKV else -(-seen * 5 // 10)  # SnapKV evicts once, after the prefill
    for i, layer in enumerate(cache.layers):
        assert layer.values.shape[2] == (seen if i in UNITS else keep)
        assert layer.keys.shape[2] == (0 if i in UNITS else keep)
    assert all(layer.keys.shape[2] == seen for layer in cache.slm.layers if layer.keys is not None)
    per_token = 2 * 16 * 4  # K or V of one layer: 2 KV heads x head size 16 x 4 bytes
    local = 2 * (4 + window) * per_token if window else 0  # 4 sinks and the window, in each mapped layer
    assert cache.kv_bytes()["llm"] == per_token * (2 * seen + 2 * 2 * keep) + local
    assert cache.kv_bytes()["baseline"] == per_token * 2 * 4 * seen


@pytest.mark.parametrize("policy", [H2O, StreamingLLM])
@pytest.mark.parametrize("window", [0, 8])
def test_unmapped_scope_batch_equals_solo(pair, policy, window):
    llm, slm = pair
    model = IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=UNITS, local_window=window), unmapped(policy))
    rows = [prompt(60, 1)[0], prompt(38, 2)[0]]
    ids, mask = left_pad(rows)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, row in enumerate(rows):
        solo = model.generate(row[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(batch[i, -6:], solo[0, -6:])


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_unmapped_scope_at_ratio_zero_is_plain_eviction(pair, policy):
    llm, slm = pair
    ids = prompt(60, 5)
    runs = [
        IAMForCausalLM.from_pair(llm, slm, MappingConfig(ratio=0.0), POLICIES[policy](budget=0.5, scope=scope)).generate(
            ids, max_new_tokens=6, do_sample=False
        )
        for scope in ("all", "unmapped")
    ]
    assert torch.equal(*runs)


def test_unmapped_scope_on_the_identity_twin_lies_between_the_extremes(twin):
    """On the identity twin, evicting layer 0 only (layers 1-3 mapped, keeping every token) is neither the LLM with
    every token nor the LLM evicting everywhere: both the eviction and the sparing took effect."""
    llm, slm = twin
    ids = prompt(60, 6)
    run = lambda scope: IAMForCausalLM.from_pair(
        llm, slm, MappingConfig(layers=[1, 2, 3], blend=1), StreamingLLM(budget=0.3, scope=scope)
    ).generate(ids, max_new_tokens=6, do_sample=False)
    spared, everywhere = run("unmapped"), run("all")
    assert not torch.equal(spared, llm.generate(ids, max_new_tokens=6, do_sample=False))
    assert not torch.equal(spared, everywhere)


def test_unmapped_scope_with_nothing_unmapped_is_refused(pair):
    """Every layer has a mapped KV group: nothing could be evicted, so the budget could not be honoured."""
    llm, slm = pair
    with pytest.raises(ValueError, match="this mapping leaves none"):
        IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=[0, 1, 2, (3, 1)]), H2O(budget=0.5, scope="unmapped"))
    IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=[0, 1, 2, (3, 1)]), H2O(budget=0.5))  # every layer: fine


def test_a_policy_scope_is_checked():
    with pytest.raises(ValueError, match="scope must be one of"):
        H2O(scope="mapped")


def test_a_token_budget_below_the_local_window_is_refused(pair):
    llm, slm = pair
    with pytest.raises(ValueError, match="smaller than the 20 tokens the policy and the exact local window"):
        IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=UNITS, local_window=8), H2O(budget=10))
    IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=UNITS, local_window=8), H2O(budget=20))


# ---- the local window with eviction over every layer --------------------------------------------------------------


def test_the_window_with_eviction_everywhere_is_the_llm_alone_with_that_eviction_on_the_twin(twin):
    """The identity twin borrows each head's own attention over the kept slots, and the window's exact part is its
    own too, so with StreamingLLM (whose sinks and recent tokens hold the window's) it is the LLM alone evicting."""
    llm, slm = twin
    ids = prompt(60, 6)
    reference = IAMForCausalLM.from_pair(llm, slm, MappingConfig(ratio=0.0), StreamingLLM(budget=0.5))
    model = IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=[1, 2, 3], blend=1, local_window=8), StreamingLLM(0.5))
    tokens = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **tokens), reference.generate(ids, **tokens))


@pytest.mark.parametrize("policy", [H2O, StreamingLLM, SnapKV])
def test_the_window_with_eviction_everywhere_keeps_its_tokens_and_batches(pair, policy):
    """The sinks and the window are always kept, so the local keys and the kept set agree after compaction; left
    padding that compaction moves is found again (batch = solo)."""
    llm, slm = pair
    model = IAMForCausalLM.from_pair(llm, slm, MappingConfig(layers=[1, (2, 0)], local_window=8), policy(budget=0.2))
    rows = [prompt(60, 1)[0], prompt(38, 2)[0]]
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    for i, row in enumerate(rows):
        solo = model.generate(row[None], max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences[i, -6:], solo.sequences[0, -6:])
        positions = solo.cache.kept.positions[0].tolist()
        seen = len(row) + 5
        assert set(range(4)) | set(range(seen - 8, seen)) <= set(positions)  # 4 sinks and the 8 latest tokens
    assert [layer.keys.shape[2] for layer in out.cache.local.layers if layer.keys is not None] == [12, 12]


# ---- the command --------------------------------------------------------------------------------------------------


@pytest.fixture
def long_folders(tmp_path) -> tuple[str, str]:
    """The tiny qwen2 pair as folders, for contexts of a few hundred characters."""
    return save_tiny_pair(tmp_path, max_positions=1024)


def test_the_command_runs_side_by_side_resumes_and_reports(long_folders, tmp_path, capsys, monkeypatch):
    llm, slm = long_folders
    argv = ["eval", "retrieval", "--llm", llm, "--slm", slm, "--tokens", "600", "--n", "2", "--out", str(tmp_path / "out")]
    argv += ["--tasks", "passkey,multikey", "--configs", "streaming@0.5,iam0.5+w8,iam0.5+w8+h2o@0.5:unmapped", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["method"], r["task"]) for r in rows[:2]] == [("llm", "passkey"), ("llm", "multikey")]
    assert [r["n"] for r in rows] == [2, 8] * 4  # multikey asks each of its 4 needles
    assert rows[0]["llm_kv_dropped"] == 0 and all(0 < r["llm_kv_dropped"] < 1 for r in rows[2:])
    assert all(r["ci_low"] <= r["accuracy"] <= r["ci_high"] for r in rows)
    for name in ("retrieval.json", "retrieval.md", "retrieval.png", "retrieval-depth.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0

    # a second run with the same settings measures nothing again, though its progress file holds a line cut short,
    # bytes that are not UTF-8 and JSON of another shape (a codec error naming no file, an internal traceback)
    progress = Path(result["progress_file"])
    with progress.open("ab") as f:
        f.write(b'{"key": ["llm", "passkey", 600, 1], "answers": [\n\xff\xfe not text\n[1, 2]\n{"key": "x"}\n{"key": ["ll')
    measure = retrieval.answer
    monkeypatch.setattr(retrieval.run, "answer", lambda *a, **k: pytest.fail("measured again"))
    with pytest.warns(UserWarning, match=rf"{progress}: skipped line\(s\) \[17, 18, 19, 20, 21\], not a recorded answer"):
        assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == rows

    # more samples, another task or length: only the new samples are measured (sample i is the same for any n)
    asked = []

    def counted(iam, tok, sample, *args):
        asked.append(sample.task)
        return measure(iam, tok, sample, *args)

    monkeypatch.setattr(retrieval.run, "answer", counted)
    with pytest.warns(UserWarning, match="skipped"):
        assert main([*argv, "--n", "3", "--tasks", "passkey,multikey,vartrack"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert sorted(asked) == sorted(["passkey", "multikey"] * 4 + ["vartrack"] * 12)  # 4 configurations
    assert [r["n"] for r in rows] == [3, 12, 3] * 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tokens", "240", "--tasks", "passkey", "--configs", "iam0.5"], "exceeds the models' 256 positions"),
        (["--configs", "iam0.5+int4"], "int4_group 32 must divide the LLM's head dimension 16"),
        (["--configs", "iam0.5+w8+h2o@10"], "smaller than the 20 tokens"),
        (["--configs", "iam0.5+zz"], "unknown part"),
        (["--configs", "iam1.0+streaming@0.5:unmapped", "--strategy", "back"], "this mapping leaves none"),
        (["--protocol", "blind"], "invalid choice"),
        (["--tasks", "needle"], "takes comma-separated tasks"),
    ],
)
def test_bad_settings_fail_before_loading(pair_folders, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr("iam.core.checks.load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    llm, slm = pair_folders
    try:
        code = main(["eval", "retrieval", "--llm", llm, "--slm", slm, "--out", str(tmp_path), *extra])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_run_is_prepared_and_checked_before_any_weights_load(pair_folders):
    """``retrieval.prepare`` refuses what ``iam eval retrieval`` refuses before loading (an eviction scope with no
    layer to evict from, a context beyond the models' positions), and makes the samples otherwise."""
    from iam.eval.setup import checked_configs
    from iam.models.loading import load_tokenizer, read_configs

    llm, slm = pair_folders
    pair, tokenizer = read_configs(llm, slm), load_tokenizer(llm)
    setups = parse_setups("iam1.0+streaming@0.5:unmapped")
    configs = checked_configs(MappingConfig(strategy="back"), setups)
    with pytest.raises(ValueError, match="this mapping leaves none"):
        retrieval.prepare(tokenizer, *pair, setups, configs, ["passkey"], [160], 1)
    with pytest.raises(ValueError, match="exceeds the models' 256 positions"):
        retrieval.prepare(tokenizer, *pair, setups[:1], configs[:1], ["passkey"], [240], 1)
    samples = retrieval.prepare(tokenizer, *pair, setups[:1], configs[:1], ["passkey"], [160], 2, seed=3)
    assert samples == {("passkey", 160): retrieval.make_samples(tokenizer, "passkey", 2, 160, seed=3)}


def test_a_length_that_fails_after_loading_is_refused_before(long_folders, tmp_path, capsys, monkeypatch):
    """A question longer than the 96 tokens kept for one passed the check, then failed after loading ("generate at
    most 0 new tokens"); kv at a short length ran fewer questions."""
    monkeypatch.setattr("iam.core.checks.load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    llm, slm = long_folders
    argv = ["eval", "retrieval", "--llm", llm, "--slm", slm, "--out", str(tmp_path), "--n", "1", "--configs", "iam0.5"]
    assert main([*argv, "--tasks", "vartrack", "--tokens", "888"]) == 2
    message = "tokens 888: a vartrack context with its question and answer (1063 tokens) exceeds the models' 1024 positions"
    assert message in capsys.readouterr().err
    assert main([*argv, "--tasks", "kv", "--tokens", "300"]) == 2
    assert "tokens 300 is too short for task kv: its 4 pairs take 382" in capsys.readouterr().err


def test_the_demo_shows_a_cached_document(long_folders, tmp_path, capsys):
    llm, slm = long_folders
    path = tmp_path / "demo.json"
    argv = ["demo", "--llm", llm, "--slm", slm, "--ratios", "0", "--max-new-tokens", "2", "--json", str(path)]
    assert main([*argv, "--retrieval", "snapkv@0.5,iam0.5+w8", "--retrieval-tokens", "600"]) == 0
    cached = json.loads(path.read_text())["retrieval"]
    assert [r["method"] for r in cached] == ["llm", "snapkv@0.5", "iam0.5+w8"]
    assert all(len(r["answers"]) == len(r["expected"]) == 4 for r in cached)
    assert cached[0]["llm_kv_dropped"] == 0 < cached[1]["llm_kv_dropped"]
    assert "four questions about it" in capsys.readouterr().out


def test_the_cli_takes_an_eviction_scope(pair_folders, capsys):
    llm, slm = pair_folders
    argv = ["generate", "--llm", llm, "--slm", slm, "--prompt", "a prompt long enough to map", "--max-new-tokens", "2"]
    argv += ["--layers", "1,3", "--local-window", "8", "--eviction", "h2o", "--budget", "0.5", "--json"]
    assert main([*argv, "--eviction-scope", "unmapped"]) == 0
    assert json.loads(capsys.readouterr().out)["timings"]["new_tokens"] == 2
    assert main([*argv, "--eviction-scope", "all"]) == 0
    capsys.readouterr()
    assert main([*argv[:-2], "10", "--json"]) == 2 and "smaller than the 20 tokens" in capsys.readouterr().err


# ---- the retrieval-aware order ---------------------------------------------------------------------------------


def test_retrieval_scores_equal_eager_attention_on_the_asked_fact():
    """Each KV group's score is, averaged over questions, its best head's attention from the queries that predict the
    answer to the answer's tokens in the context (the most any query gives each token, summed), as eager attention
    weights over the whole sequence give it."""
    from iam.eval.calibrate import retrieval_order, retrieval_scores

    llm, tok = tiny("qwen2", 4, 64, 4, 2, seed=0), char_tokenizer()
    llm.config.max_position_embeddings = 1024
    samples = retrieval.make_samples(tok, "multikey", 1, 600, seed=1)
    scores = retrieval_scores(llm, tok, samples)
    llm.config._attn_implementation = "eager"
    expected = torch.zeros(4, 2)
    head = retrieval.prompt_parts(tok)[0]
    for question in samples[0].questions:
        context, asked = retrieval.encode(tok, samples[0], question)
        code = question.answers[0]
        start = len(head) + samples[0].context.index(code)  # one character per token
        answer = tok(code, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([context, asked, answer[:, :-1]], -1)
        with torch.no_grad():
            attentions = llm(input_ids=ids, output_attentions=True).attentions
        for layer, a in enumerate(attentions):
            read = a[0, :, -answer.shape[1] :, start : start + len(code)].amax(1).sum(-1)  # [heads]
            expected[layer] += read.unflatten(0, (2, -1)).amax(1) / len(samples[0].questions)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    order = retrieval_order(scores)
    assert sorted(order) == [(i, g) for i in range(4) for g in range(2)]
    assert [float(scores[u]) for u in order] == sorted(float(scores[u]) for u in order)


def test_the_retrieval_order_is_stored_and_read_back_and_a_corrupt_file_is_refused_by_name(long_folders, tmp_path, capsys):
    """``iam calibrate --method retrieval`` writes the order, the same on a second run; ``--calibration`` maps its
    first units; a corrupt file is refused naming it."""
    llm, slm = long_folders
    argv = ["calibrate", "--llm", llm, "--slm", slm, "--method", "retrieval", "--windows", "1", "--tokens", "600"]
    orders = []
    for run in ("a", "b"):
        assert main([*argv, "--to", str(tmp_path / run), "--out", str(tmp_path / run), "--json"]) == 0
        orders.append(json.loads(capsys.readouterr().out)["order"])
    assert orders[0] == orders[1] and len(orders[0]) == 8
    stored = next((tmp_path / "a").glob("*.json"))
    record = json.loads(stored.read_text())
    assert record["order"] == orders[0] and record["source"]["method"] == "retrieval" and record["source"]["seed"] == 1
    prompt = ["--prompt", "x " * 30, "--max-new-tokens", "1", "--json"]
    gen = ["generate", "--llm", llm, "--slm", slm, "--strategy", "calibrated", "--ratio", "0.25"]
    assert main([*gen, "--calibration", str(stored), *prompt]) == 0
    assert json.loads(capsys.readouterr().out)["mapped_layers"] == sorted(f"{i}:{g}" for i, g in orders[0][:2])
    stored.write_text(stored.read_text()[:-20])
    assert main([*gen, "--calibration", str(stored), *prompt]) == 2
    assert str(stored) in capsys.readouterr().err
