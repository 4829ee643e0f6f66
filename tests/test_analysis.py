"""The analyses across models on tiny pairs built in code: similarity across tokenizers (token alignment), mapping
statistics, mean attention maps, summarization with ROUGE and the multi-task sweep; through the library and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import WORD_VOCAB, char_tokenizer, prompt, tiny, word_tokenizer
from iam import MappingConfig
from iam.cli import main
from iam.eval import analysis, generation, sweep
from iam.eval.alignment import align_spans, attention_probs, restrict, token_spans
from iam.eval.perplexity import perplexity
from iam.eval.windows import text_windows, window_texts

TEXT = "the cat sat on the mat, as it was. " * 40


# ---- alignment -----------------------------------------------------------------------------------------------------
def test_align_spans_keeps_exactly_the_shared_character_spans():
    a = [(0, 1), (1, 2), (2, 4), (4, 5), (5, 5), (5, 8)]
    b = [(0, 2), (2, 4), (4, 5), (5, 5), (5, 7), (7, 8)]
    assert align_spans(a, b) == ([2, 3], [1, 2])  # (2, 4) and (4, 5); the empty span (5, 5) never aligns
    assert align_spans(a, a) == ([0, 1, 2, 3, 5], [0, 1, 2, 3, 5])
    assert align_spans(a, []) == ([], [])


def test_two_tokenizations_align_on_the_characters_they_cut_alike():
    text = "the cat sat on a mat."
    (_, a), (_, b) = token_spans(char_tokenizer(), text), token_spans(word_tokenizer(), text)
    ia, ib = align_spans(a, b)
    assert len(b) < len(a) and 0 < len(ia) < len(b)
    assert all(text[slice(*a[i])] == text[slice(*b[j])] for i, j in zip(ia, ib))
    assert "the" not in {text[slice(*a[i])] for i in ia}  # a whole word of one is three characters of the other


def test_restrict_renormalises_the_rows_and_is_the_identity_on_all_tokens():
    probs = attention_probs(tiny("llama", 2, 32, 2, 1, seed=3), prompt(12))  # [L, H, T, T]
    assert torch.allclose(restrict(probs, list(range(12))), probs)
    sub = restrict(probs, [0, 3, 4, 9])
    assert sub.shape == (2, 2, 4, 4) and torch.allclose(sub.sum(-1), torch.ones(2, 2, 4))
    assert (sub.triu(1) == 0).all()  # still causal


# ---- similarity across tokenizers ----------------------------------------------------------------------------------
def test_cross_similarity_on_one_tokenizer_is_the_same_family_analysis(family):
    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 2, 1, seed=1)
    tok = char_tokenizer()
    windows, texts = text_windows(tok, TEXT, 2, 60), window_texts(tok, TEXT, 2, 60)
    assert [tok.decode(w[0]) for w in windows] == texts
    config = MappingConfig(truncation_threshold=40)
    same = analysis.eval_similarity(llm, slm, windows, config, progress=False)
    cross = analysis.eval_cross_similarity(llm, slm, tok, tok, texts, config, progress=False)
    assert cross["alignment"]["aligned_share_of_llm_tokens"] == 1.0
    assert cross["alignment"]["windows"][0] == {"llm_tokens": 40, "slm_tokens": 40, "aligned": 40}
    for a, b in zip(same["rows"], cross["rows"]):
        assert a["mean_best_similarity"] == pytest.approx(b["mean_best_similarity"], abs=1e-5)
    assert torch.allclose(torch.tensor(same["heatmap"]), torch.tensor(cross["heatmap"]), atol=1e-5)


def save_cross_pair(folder, llm_family: str) -> list[str]:
    """A tiny ``llm_family`` LLM with the character tokenizer and a tiny Llama SLM with the word tokenizer (another
    vocabulary), saved as transformers folders under ``folder``, and a text file: ``--llm``, ``--slm``, ``--text``."""
    paths = []
    for name, model, tok in [
        ("llm", tiny(llm_family, 4, 64, 4, 2, seed=0), char_tokenizer()),
        ("slm", tiny("llama", 2, 32, 2, 1, seed=1, vocab=WORD_VOCAB), word_tokenizer()),
    ]:
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        paths.append(str(folder / name))
    (folder / "text.txt").write_text(TEXT)
    return ["--llm", paths[0], "--slm", paths[1], "--text", str(folder / "text.txt"), "--device", "cpu"]


def test_similarity_across_tokenizers_runs_but_mapping_still_refuses(tmp_path, capsys):
    pair = save_cross_pair(tmp_path, "llama")
    args = ["similarity", *pair, "--windows", "2", "--tokens", "50", "--out", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["rows"]) == 4 and len(result["heatmap"][0]) == 2  # 4 LLM layers x 2 SLM layers
    assert all(-1 <= r["mean_best_similarity"] <= 1 for r in result["rows"])
    counts = result["alignment"]["windows"][0]
    assert counts["llm_tokens"] == 50 and counts["aligned"] < counts["slm_tokens"] < counts["llm_tokens"]
    assert (tmp_path / "out" / "similarity.png").stat().st_size > 0
    assert main(["generate", *pair[:4], "--prompt", "the cat", "--max-new-tokens", "1"]) == 2  # mapping: today's message
    assert "LLM and SLM vocabularies differ (vocab_size 97 vs 102); IAM needs one tokenizer for both." in capsys.readouterr().err


def test_similarity_across_families(tmp_path, capsys):
    pair = save_cross_pair(tmp_path, "qwen2")
    assert main(["similarity", *pair, "--windows", "1", "--tokens", "50", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["rows"]) == 4 and 0 < result["alignment"]["aligned_share_of_llm_tokens"] < 1
    assert main(["generate", *pair[:4], "--prompt", "the cat", "--max-new-tokens", "1"]) == 2
    assert "LLM and SLM are of different families ('qwen2' vs 'llama')" in capsys.readouterr().err


def test_too_few_shared_spans_is_a_clear_error():
    llm, slm = tiny("llama", 2, 32, 2, 1, seed=0), tiny("llama", 2, 32, 2, 1, seed=1, vocab=WORD_VOCAB)
    texts = ["the the"]  # one shared span: the space
    with pytest.raises(ValueError, match="share 1 token spans"):
        analysis.eval_cross_similarity(llm, slm, char_tokenizer(), word_tokenizer(), texts, MappingConfig(), progress=False)


# ---- mapping statistics and attention maps -------------------------------------------------------------------------
def test_mapping_stats_of_the_identity_twin(twin):
    llm, slm = twin
    windows = [("a", prompt(40, seed=1)), ("a", prompt(40, seed=2)), ("b", prompt(40, seed=3))]
    result = analysis.eval_mapping_stats(llm, slm, windows, 0.5, MappingConfig(blend=1), progress=False)
    # every mapped head borrows its own twin, on every window
    assert result["modes"] and all((m["slm_layer"], m["slm_head"]) == (m["llm_layer"], m["llm_head"]) for m in result["modes"])
    assert all(m["share"] == 1.0 for m in result["modes"]) and result["concentration"]["mode_agreement"] == 1.0
    mapped = {m["llm_layer"] for m in result["modes"]}
    usage = torch.tensor(result["usage"])
    assert usage.sum().item() == pytest.approx(3 * len(result["modes"]))  # one unit of weight per mapped head and window
    assert (usage[sorted(mapped)] == 3).all() and result["concentration"]["heads_never_used"] == int((usage == 0).sum())
    for row in result["rows"]:
        assert row["never_needed"] == sorted(set(range(4)) - mapped) and row["deepest_slm_layer"] == max(mapped)
    assert result["slm_layers_never_needed_on_any_window"] == sorted(set(range(4)) - mapped)


def test_mapping_stats_weigh_blended_heads(pair):
    llm, slm = pair
    windows = [("x", prompt(30, seed=s)) for s in range(3)]
    result = analysis.eval_mapping_stats(llm, slm, windows, 0.5, MappingConfig(blend=2), progress=False)
    usage = torch.tensor(result["usage"])
    assert usage.shape == (2, 2) and usage.sum().item() == pytest.approx(3 * len(result["modes"]))
    c = result["concentration"]
    assert c["slm_heads"] == 4 and 0.25 <= c["top1_share"] <= c["top5_share"] == pytest.approx(1.0)
    assert 1 <= c["heads_for_half_of_use"] <= 2


def test_a_window_too_short_to_map_is_a_clear_error(pair):
    with pytest.raises(ValueError, match="establish_threshold 20"):
        analysis.eval_mapping_stats(*pair, [("x", prompt(10))], 0.5, MappingConfig(), progress=False)


def test_attention_maps_of_the_identity_twin(twin):
    llm, slm = twin
    result = analysis.eval_attention_maps(llm, slm, prompt(32), 0.5, MappingConfig())
    rows = {r["map"]: r for r in result["rows"]}
    assert list(rows) == ["SLM", "LLM", "LLM, mapped layers", "IAM, mapped layers"]
    maps = {k: torch.tensor(v) for k, v in result["maps"].items()}
    assert torch.allclose(maps["SLM"], maps["LLM"]) and torch.allclose(maps["IAM, mapped layers"], maps["LLM, mapped layers"])
    assert rows["IAM, mapped layers"]["cosine_to_llm_mapped"] == pytest.approx(1.0)
    assert rows["LLM, mapped layers"]["matrices"] == 2 * 4  # half of 4 layers, 4 heads each
    assert all(torch.allclose(m.sum(-1), torch.ones(32)) for m in maps.values())


def test_attention_maps_of_a_pair_differ(pair):
    result = analysis.eval_attention_maps(*pair, prompt(32), 0.5, MappingConfig())
    rows = {r["map"]: r for r in result["rows"]}
    assert rows["IAM, mapped layers"]["cosine_to_llm_mapped"] < 1 - 1e-4
    assert rows["SLM"]["matrices"] == 2 * 2 and rows["LLM"]["matrices"] == 4 * 4


# ---- summarization and the multi-task sweep ------------------------------------------------------------------------
def test_rouge_scores_by_rouge_score():
    assert generation.rouge(["the cat sat"], ["the cat sat"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    scores = generation.rouge(["cats sitting", "nothing"], ["the cat sat", "nothing here"])
    assert scores["rouge1"] == pytest.approx((0.4 + 2 / 3) / 2)  # stemmed: cats -> cat


def test_summaries_skip_short_documents_and_report_them(pair):
    llm, slm = pair
    tok = char_tokenizer()
    docs = [{"title": "a", "document": TEXT, "summary": "the cat sat"}, {"title": "b", "document": "too short", "summary": "x"}]
    result = generation.eval_summarize(llm, slm, tok, docs, [0.5], MappingConfig(), 4, context=60, min_tokens=20, progress=False)
    assert [r["ratio"] for r in result["rows"]] == [0.0, 0.5] and result["rows"][0]["n"] == 1
    assert result["skipped"] == {"shorter than --min-tokens": 1}
    assert result["generation"] == {"greedy": True, "repetition_penalty": 1.2, "max_new_tokens": 4, "context": 60}
    with pytest.raises(ValueError, match="no document left to summarize"):
        generation.eval_summarize(llm, slm, tok, docs[1:], [0.5], MappingConfig(), 4, context=60, min_tokens=20)


def test_wikipedia_summaries_are_body_and_lead():
    from iam.eval.data import load_summaries

    docs, skipped = load_summaries("wikipedia")
    assert len(docs) > 100 and sum(skipped.values()) >= 1
    anarchism = docs[0]
    assert anarchism["summary"].startswith("Anarchism is a political philosophy")
    assert "Etymology" in anarchism["document"][:100] and anarchism["summary"][:200] not in anarchism["document"]
    with pytest.raises(ValueError, match="unknown summarization data set"):
        load_summaries("nope")


def test_pearson():
    assert sweep.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9934, abs=1e-4)
    assert sweep.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert sweep.pearson([1, 1, 1], [1, 2, 3]) is None


def test_task_sweep_correlates_each_task_with_the_first(pair):
    llm, slm = pair
    windows = [prompt(30, seed=s) for s in range(2)]
    ppl = lambda iam: perplexity(iam, windows, progress=False)[0]
    tasks = {"perplexity": ppl, "qa": lambda iam: -ppl(iam), "choice": lambda iam: ppl(iam)}
    result = sweep.eval_task_sweep(llm, slm, tasks, 2, MappingConfig(), progress=False)
    assert [r["block"] for r in result["rows"]] == ["none", "0-1", "2-3"]
    # qa's score is minus perplexity: the same quality ranking (+1); choice's is perplexity itself: reversed (-1)
    assert result["correlation"] == pytest.approx({"perplexity": 1.0, "qa": 1.0, "choice": -1.0})
    with pytest.raises(ValueError, match="unknown sweep tasks"):
        sweep.eval_task_sweep(llm, slm, {"bleu": ppl}, 2, MappingConfig())


# ---- the commands on a tiny same-family pair -----------------------------------------------------------------------
@pytest.fixture
def tiny_pair(tmp_path) -> list[str]:
    folders = []
    for name, model in [("llm", tiny("llama", 4, 64, 4, 2, seed=0)), ("slm", tiny("llama", 2, 32, 2, 1, seed=1))]:
        model.save_pretrained(tmp_path / name)
        char_tokenizer().save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    (tmp_path / "text.txt").write_text(TEXT)
    return ["--llm", folders[0], "--slm", folders[1], "--device", "cpu", "--out", str(tmp_path / "out"), "--json"]


def run(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(open(path).read() for path in result["files"].values() if not path.endswith(".png"))
    return result


def test_eval_commands_on_the_tiny_pair(tiny_pair, tmp_path, capsys):
    text = ["--text", str(tmp_path / "text.txt")]
    stats = run(capsys, "eval", "mapping-stats", *tiny_pair, *text, "--windows", "3", "--tokens", "40")
    assert len(stats["rows"]) == 3 and "png" in stats["files"] and stats["provenance"]["argv"].startswith("iam eval")
    maps = run(capsys, "eval", "attention-maps", *tiny_pair, *text, "--tokens", "30")
    assert len(maps["maps"]["SLM"]) == 30 and "png" in maps["files"]
    summary = run(capsys, "eval", "summarize", *tiny_pair, "--limit", "2", "--max-new-tokens", "3", "--context", "64")
    assert [r["ratio"] for r in summary["rows"]] == [0.0, 0.3, 0.5] and summary["rows"][0]["n"] == 2
    assert summary["dataset"] == "wikipedia" and "rougeL" in summary["rows"][1]
    sweep = run(
        capsys, "eval", "sweep", *tiny_pair, *text, "--windows", "1", "--tokens", "40", "--block", "2",
        "--tasks", "perplexity,choice,qa,summarize", "--limit", "2", "--max-new-tokens", "2",
    )  # fmt: skip
    assert [r["block"] for r in sweep["rows"]] == ["none", "0-1", "2-3"] and sweep["correlation"]["perplexity"] == pytest.approx(
        1.0
    )
    assert set(sweep["rows"][0]) >= {"perplexity", "choice", "qa", "summarize"} and "png" in sweep["files"]
    # qa and choice share their scoring with the sweep's tasks
    qa = run(capsys, "eval", "qa", *tiny_pair, "--limit", "3", "--max-new-tokens", "2", "--ratios", "0.5")
    assert [r["ratio"] for r in qa["rows"]] == [0.0, 0.5] and qa["rows"][0]["n"] == 3 and len(qa["examples"]["0.0"]) == 3
    choice = run(capsys, "eval", "choice", *tiny_pair, "--limit", "3", "--ratios", "0.5")
    assert [r["ratio"] for r in choice["rows"]] == [0.0, 0.5] and all(0 <= r["accuracy"] <= 1 for r in choice["rows"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "summarize", "--dataset", "nope"], "unknown summarization data set 'nope'"),
        (["eval", "summarize", "--min-tokens", "2000"], "need 0 < --min-tokens 2000 <= --context 1024"),
        (["eval", "mapping-stats", "--tokens", "10"], "a --tokens window of 10 tokens is below establish_threshold 20"),
        (["eval", "mapping-stats", "--windows", "50", "--tokens", "40"], "fewer than --windows 50 x --tokens 40"),
        (["eval", "attention-maps", "--ratio", "0"], "--ratio 0.0 maps nothing: iam eval attention-maps measures mapped layers"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_pair, tmp_path, capsys, argv, message):
    text = [] if "summarize" in argv else ["--text", str(tmp_path / "text.txt")]
    assert main([*argv, *tiny_pair, *text]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["sweep", "--tasks", "perplexity,bleu"],
            "--tasks takes distinct comma-separated tasks of perplexity,choice,qa,summarize",
        ),
        (["sweep", "--tasks", "qa,qa"], "--tasks takes distinct comma-separated tasks"),
        (["sweep", "--tasks", ""], "--tasks takes distinct comma-separated tasks"),
        (["sweep", "--limit", "0"], "--limit: takes a whole number of at least 1; got '0'"),
        (["summarize", "--limit", "0"], "--limit: takes a whole number of at least 1; got '0'"),
        (["summarize", "--max-new-tokens", "x"], "--max-new-tokens: takes a whole number of at least 1; got 'x'"),
        (["summarize", "--min-tokens", "0"], "--min-tokens: takes a whole number of at least 1"),
    ],
)
def test_bad_flags_are_explained(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["eval", *argv])
    assert message in capsys.readouterr().err


def test_govreport_summaries_skip_blank_pairs_offline(monkeypatch):
    from iam.eval import data

    rows = {"report": ["A report.", "  ", "Another report."], "summary": ["Its summary.", "x", ""]}
    monkeypatch.setattr(data, "_online", lambda name, path, config, split: rows)
    docs, skipped = data.load_summaries("govreport")
    assert docs == [{"title": "govreport-0", "document": "A report.", "summary": "Its summary."}]
    assert skipped == {"blank report or summary": 2}


def test_similarity_refuses_a_family_the_decoder_cannot_run(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    pair = save_cross_pair(tmp_path, "llama")
    GPT2LMHeadModel(GPT2Config(vocab_size=WORD_VOCAB, n_layer=1, n_embd=16, n_head=2)).save_pretrained(tmp_path / "slm")
    assert main(["similarity", *pair, "--windows", "1", "--tokens", "40", "--out", str(tmp_path)]) == 2
    assert "SLM has model_type 'gpt2'; supported families: ['qwen2', 'llama', 'qwen3'" in capsys.readouterr().err
