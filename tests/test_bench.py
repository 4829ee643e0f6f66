"""Smoke runs of every bench mode (seconds): JSON keys and the paper's KV arithmetic. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

import iam
from conftest import tiny
from iam.cli import main
from iam.core.kernels import Kernels
from iam.eval.costs import Scenario, analytic_rows, break_even, kv_bytes_per_token
from iam.models.presets import PRESETS, Arch, load_arch
from iam.reporting import provenance


def test_paper_kv_arithmetic_qwen2_72b_with_0_5b():
    llm, slm = PRESETS["qwen2-72b"], PRESETS["qwen2-0.5b"]
    assert kv_bytes_per_token(llm, slm, 0, 2) == 327_680
    assert kv_bytes_per_token(llm, slm, 40, 2) / 327_680 == pytest.approx(0.7875)
    # int8 SLM cache: 64 one-byte values + one fp16 scale per head and token instead of 128 bytes.
    assert kv_bytes_per_token(llm, slm, 40, 2, "int8") == 245_760 + 2 * 24 * 2 * 66
    assert kv_bytes_per_token(llm, slm, 40, 2, "int8") / 327_680 <= 0.770


def test_break_even_shows_the_shipped_pair_needs_a_high_ratio():
    # 1.5B drops 512 B/token per mapped layer; the 0.5B adds 12,288 B/token: 25 of 28 layers to break even.
    assert break_even(PRESETS["qwen2.5-coder-1.5b"], PRESETS["qwen2.5-coder-0.5b"]) == pytest.approx(25 / 28)
    assert break_even(PRESETS["qwen2-72b"], PRESETS["qwen2-0.5b"]) == pytest.approx(7 / 80)  # 7 x 2,048 > 12,288
    # with the int8 SLM cache (6,336 B/token) the shipped pair breaks even at 13 of 28 layers
    assert break_even(PRESETS["qwen2.5-coder-1.5b"], PRESETS["qwen2.5-coder-0.5b"], 2, "int8") == pytest.approx(13 / 28)


def test_memory_budget_capacity_at_paper_long_context():
    rows = analytic_rows(PRESETS["qwen2-72b"], PRESETS["qwen2-0.5b"], [0.5], Scenario(8192, 8, 512), 2, 640)
    assert rows[0]["ratio"] == 0 and rows[0]["max_batch"] > 0
    assert rows[1]["batch_ratio"] >= 1.25 and rows[1]["throughput_ratio"] >= 1.2
    assert rows[3]["slm_cache"] == "int8" and rows[3]["batch_ratio"] > rows[1]["batch_ratio"]


def test_preset_param_counts_are_real():
    assert PRESETS["qwen2-72b"].params / 1e9 == pytest.approx(72.7, abs=0.2)
    assert PRESETS["qwen2-0.5b"].params / 1e9 == pytest.approx(0.494, abs=0.01)
    assert PRESETS["llama-3.1-70b"].params / 1e9 == pytest.approx(70.6, abs=0.2)


def test_config_json_is_read(tmp_path):
    cfg = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_arch(str(tmp_path)) == Arch(2, 64, 4, 2, 16, 128, 100, False)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_arch(str(tmp_path / "nope"))


def test_cli_analytic(tmp_path, capsys):
    argv = ["bench", "--analytic", "--scenario", "long", "--memory-budget", "640", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    made = result["provenance"]  # what reproduces it
    assert made["argv"] == "iam " + " ".join(argv) and made["transformers"] == transformers.__version__
    checkout = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(iam.__file__).parent, capture_output=True, text=True)
    assert made["git_commit"] == (checkout.stdout.strip() if checkout.returncode == 0 else None)
    rows = result["rows"]
    assert [(r["slm_cache"], r["ratio"]) for r in rows] == [(m, r) for m in ("native", "int8") for r in (0.0, 0.3, 0.5)]
    assert {"slm_cache", "ratio", "kv_bytes", "kv_ratio", "ttft_limit", "tpot_limit", "max_batch", "throughput_ratio"} <= rows[
        0
    ].keys()
    assert rows[2]["kv_ratio"] == pytest.approx(0.7875)
    assert rows[5]["kv_ratio"] <= 0.770 and rows[5]["batch_ratio"] >= 1.25 and rows[5]["throughput_ratio"] >= 1.2
    assert {"llm", "slm", "break_even_ratio_native", "break_even_ratio_int8"} <= result["break_even"][0].keys()
    assert (tmp_path / "bench-analytic.md").read_text().startswith("| slm_cache |")


@pytest.mark.slow
def test_cli_measured_smoke(tmp_path, capsys, monkeypatch):
    from iam.bench.memory import malloc_in_use

    args = ["bench", "--prompt", "24", "--batch", "2", "--new-tokens", "3", "--repeats", "1", "--ratios", "0.5"]
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000000")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["allocator"]["MALLOC_TRIM_THRESHOLD_"] == "1000000000" and result["threads"] >= 1  # how it was timed
    assert ("MALLOC_MMAP_MAX_=0" in out.err) == (malloc_in_use() is not None)  # glibc's defaults: a hint to steady them
    rows = result["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    for key in ("kv_bytes", "kv_ratio", "ttft_s", "tpot_s", "throughput_tok_s", "peak_mem_bytes", "ttft_speedup", "tpot_speedup"):
        assert key in rows[1]
    # IAM's budget: the LLM alone (less what mapping saves) plus the SLM alone, measured in the same rounds
    for name in ("ttft", "tpot"):
        assert 0 < rows[1][f"slm_{name}_s"] < rows[1][f"{name}_budget_s"] < rows[0][f"{name}_s"] + rows[1][f"slm_{name}_s"]
        assert rows[1][f"{name}_vs_budget"] == pytest.approx(rows[1][f"{name}_s"] / rows[1][f"{name}_budget_s"], rel=1e-6)
    # On the shipped pair the SLM cache outweighs what 14 mapped layers save (see README).
    assert rows[1]["kv_llm_bytes"] < rows[0]["kv_bytes"] < rows[1]["kv_bytes"]


def test_every_measured_mode_runs_side_by_side_with_its_budget(pair_folders, tmp_path, capsys):
    """Plain IAM, the exact local window, eviction alone and with IAM, in one run on the tiny pair: every row is
    written with its spread, and every budget lies between the SLM alone (none for eviction alone) and the LLM alone
    plus the SLM alone, round by round: its share of the LLM alone's arithmetic lies in (0, 1], above 1 only where a
    window's mapped layer does more arithmetic than the layer alone (see the next test)."""
    llm, slm = pair_folders
    configs = "iam0.5,iam0.5+w4,llm+streaming@0.8,iam0.5+streaming@0.8,iam0.5+w4+h2o@0.7"
    argv = ["bench", "--llm", llm, "--slm", slm, "--configs", configs, "--tokens", "96,128", "--batch", "2"]
    argv += ["--new-tokens", "3", "--repeats", "2", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["prompt"], r["config"]) for r in rows] == [(p, c) for p in (96, 128) for c in ["llm", *configs.split(",")]]
    on = {key: rows[0][key] for key in ("cpu", "cpu_isa", "threads", "cuda")}  # every row names the machine
    assert on == {key: provenance([])[key] for key in on} and all(on.items() <= r.items() for r in rows)
    for prompt in (96, 128):
        alone, *others = [r for r in rows if r["prompt"] == prompt]
        assert "ttft_budget_s" not in alone and alone["kernels"] is None
        assert all(row["kernels"] == Kernels().summary() for row in others)
        for row in others:
            assert row["ttft_min_s"] <= row["ttft_s"] <= row["ttft_max_s"]
            assert row["ttft_vs_budget_min"] <= row["ttft_vs_budget"] <= row["ttft_vs_budget_max"]
            for name in ("ttft", "tpot"):
                slm_part = row[f"slm_{name}_s"]
                assert (slm_part == 0) == (row["ratio"] == 0) and slm_part < row[f"{name}_budget_s"]
                # the tiny SLM's heads are as wide as the LLM's, so a window costs more than the layer it maps
                assert 0 < row[f"{name}_llm_share"] <= (1.05 if row["local_window"] and name == "ttft" else 1)
        plain, window = (next(r for r in others if r["config"] == c) for c in ("iam0.5", "iam0.5+w4"))
        assert window["ttft_llm_share"] > plain["ttft_llm_share"] and window["tpot_llm_share"] > plain["tpot_llm_share"]
        assert window["local_window"] == 4 and window["kv_llm_bytes"] > plain["kv_llm_bytes"]
    assert (tmp_path / "bench-concurrency.md").read_text().startswith("| prompt | config |")


def test_profile_splits_each_prefill_into_its_parts(pair_folders, tmp_path, capsys):
    llm, slm = pair_folders
    argv = ["bench", "--profile", "--llm", llm, "--slm", slm, "--configs", "iam0.5,iam0.5+w4+streaming@0.8", "--prompt", "64"]
    assert main([*argv, "--batch", "2", "--repeats", "1", "--blend", "2", "--out", str(tmp_path), "--json"]) == 0
    alone, plain, window = json.loads(capsys.readouterr().out)["rows"]
    assert alone["slm_s"] == alone["establish_s"] == alone["mapped_attention_s"] == 0 and alone["llm_own_share"] == 1
    for row in (plain, window):
        for part in ("slm", "slm_window", "establish", "match", "blend_fit", "routes", "mapped_attention"):
            assert row[f"{part}_s"] > 0, part
        assert row["blend_fit_s"] <= row["match_s"] <= row["establish_s"] < row["profiled_ttft_s"]
        assert 0 < row["llm_own_share"] < 1
    assert plain["evict_s"] == 0 < window["evict_s"]
    assert alone["kernels"] is None and plain["kernels"] == window["kernels"] == Kernels().summary()


def test_budget_shares_count_the_window_and_eviction():
    """A window's mapped layer projects Q/K again and attends to its window, so it costs more of the LLM's arithmetic
    than plain mapping, and more than the LLM alone where the window is long against the prompt; eviction leaves
    prefill alone and cuts what a decode step reads."""
    from iam.eval.costs import llm_shares

    llm, slm, at = PRESETS["qwen2.5-coder-1.5b"], PRESETS["qwen2.5-coder-0.5b"], Scenario(1024, 1, 32)
    plain, window = llm_shares(llm, slm, 14, at, 2), llm_shares(llm, slm, 14, at, 2, 68)
    evicted = llm_shares(llm, slm, 0, at, 2, 0, 0.5)
    assert plain[0] < window[0] < 1 and plain[1] < window[1] < 1
    assert llm_shares(llm, slm, 14, Scenario(256, 1, 32), 2, 68)[0] > 1
    assert evicted[0] == 1 and evicted[1] < 1
    assert llm_shares(llm, slm, 0, at, 2) == (1, 1)


def test_setups_the_budget_does_not_model_are_refused():
    """The budget models eviction over every layer and the LLM's cache in its own dtype: a setup evicting only from
    unmapped layers, or holding an int8 cache, would be set against a wrong budget without a word."""
    from iam import MappingConfig
    from iam.bench.measure import measure
    from iam.eval.setup import parse_setups

    llm, slm = tiny("qwen2", 4, 64, 4, 2, 0), tiny("qwen2", 2, 32, 2, 1, 1)
    for configs in ("iam0.5+h2o@0.5:unmapped", "iam0.5+int8", "llm+int8", "llm+int4", "iam0.5+slm-int4", "kvzip@0.5"):
        with pytest.raises(ValueError, match="not measured against one"):
            measure(llm, slm, parse_setups(configs), Scenario(24, 1, 2), 1, MappingConfig(), progress=False)


def test_the_llm_alone_with_an_int8_cache_is_not_the_llm_alone():
    from iam.eval.setup import parse_setups

    assert [s.label for s in parse_setups("llm+int8,iam0.5")] == ["llm", "llm+int8", "iam0.5"]


def test_bench_configs_and_ratio_flags_do_not_mix(capsys):
    assert main(["bench", "--configs", "iam0.5", "--ratios", "0.3"]) == 2
    assert "either --configs" in capsys.readouterr().err


def test_measured_bench_drops_its_warm_up_round(monkeypatch):
    from iam import MappingConfig
    from iam.bench.measure import measure
    from iam.bench.memory import PeakMemory
    from iam.eval.setup import parse_setups

    slm_times = iter([{"ttft_s": 100.0, "tpot_s": 100.0}, {"ttft_s": 0.5, "tpot_s": 0.25}])  # the warm-up's, then a timed one
    monkeypatch.setattr("iam.bench.measure.time_slm", lambda *a: next(slm_times))
    sampled = []  # each sampler reports a peak of its own, so the rows show which one they took

    def exit_(self, *exc, exit_=PeakMemory.__exit__):
        exit_(self, *exc)
        sampled.append(self)
        self.bytes = 1000 * len(sampled)

    monkeypatch.setattr(PeakMemory, "__exit__", exit_)
    llm, slm = tiny("qwen2", 4, 64, 4, 2, 0), tiny("qwen2", 2, 32, 2, 1, 1)
    rows = measure(llm, slm, parse_setups("iam0.5"), Scenario(24, 2, 3), 1, MappingConfig(), progress=False)
    assert rows[1]["slm_ttft_s"] == 0.5 and rows[1]["slm_tpot_s"] == 0.25
    assert next(slm_times, None) is None  # one warm-up round, then one timed round
    # memory is sampled in the warm-up round only (the sampler would perturb the timed runs), once per configuration
    assert len(sampled) == 2 and [r["peak_mem_bytes"] for r in rows] == [1000, 2000]


def test_slm_alone_is_timed_with_iams_kind_of_slm_cache(monkeypatch):
    from iam.bench.measure import time_slm
    from iam.core.layers import Int8Layer

    quantize, calls = Int8Layer._quantize, []
    monkeypatch.setattr(Int8Layer, "_quantize", staticmethod(lambda x: calls.append(1) or quantize(x)))
    slm = tiny("qwen2", 2, 32, 2, 1, 1)
    ids = torch.randint(0, slm.config.vocab_size, (1, 8))
    time_slm(slm, ids, 3)
    assert calls == []
    time_slm(slm, ids, 3, "int8")
    assert len(calls) == 2 * 2 * 3  # K and V of both layers, at the prompt and two steps


def test_cli_projection_smoke(tmp_path, capsys, monkeypatch):
    cfg = {
        "num_hidden_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "vocab_size": 512,
        "model_type": "qwen2",
    }
    for name, layers in (("big", 4), ("small", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    args = [
        "bench",
        "--projection",
        "--llm",
        str(tmp_path / "big"),
        "--slm",
        str(tmp_path / "small"),
        "--tokens",
        "16",
        "--repeats",
        "1",
        "--decode-repeats",
        "2",
        "--ratios",
        "0.5",
        "--device",
        "cpu",
    ]
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {
        "layer_prefill_s",
        "mapped_layer_prefill_s",
        "eager_layer_prefill_s",
        "slm_decode_s",
        "slm_rows_decode_s",
        "mapped_over_unmapped_prefill_arithmetic",
    } <= result["parts"][0].keys()
    assert (result["repeats"], result["decode_repeats"]) == (1, 2) and "allocator" in result
    rows = result["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    for key in ("ttft_s", "tpot_s", "ttft_speedup", "tpot_speedup", "ttft_limit", "tpot_limit", "kv_ratio"):
        assert key in rows[1]
    assert result["parts"][0]["eager_layer_prefill_s"] > 0 and rows[1]["ttft_speedup_vs_eager"] > 0
    # Where eager's T x T probabilities would not fit, the eager baseline is left out instead of running out of memory.
    monkeypatch.setattr("iam.bench.projection.eager_budget", lambda device: 4 * 16 * 16 * 4 - 1)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert "MALLOC_MMAP_MAX_" not in out.err and result["allocator"]["MALLOC_MMAP_MAX_"] == "0"
    assert result["parts"][0]["eager_layer_prefill_s"] is None and result["rows"][1]["ttft_speedup_vs_eager"] is None
    assert result["rows"][1]["ttft_speedup"] > 0


def test_projection_with_the_local_window(tmp_path, capsys):
    """The projected layer can map with an exact local window, on FlexAttention from 256 tokens: its arithmetic
    counts the re-projected Q/K and the window, and every row reports how near its TTFT speedup runs to its limit."""
    cfg = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}
    for name, layers in (("big", 4), ("small", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers, "vocab_size": 512}))
    argv = ["bench", "--projection", "--llm", str(tmp_path / "big"), "--slm", str(tmp_path / "small"), "--tokens", "300"]
    argv += ["--repeats", "1", "--decode-repeats", "2", "--ratios", "0.5", "--device", "cpu", "--json"]
    results = []
    for window in ([], ["--local-window", "16"]):
        assert main([*argv, *window, "--out", str(tmp_path / str(len(window)))]) == 0
        results.append(json.loads(capsys.readouterr().out))
    plain, local = results
    assert local["local_window"] == 16 and plain["local_window"] == 0
    assert plain["parts"][0]["reference_kernel_prefill_s"] is None and local["parts"][0]["reference_kernel_prefill_s"] > 0
    assert all(row["kernels"] == Kernels().summary() for row in [*local["parts"], *local["rows"]])
    arithmetic = "mapped_over_unmapped_prefill_arithmetic"
    assert plain["parts"][0][arithmetic] < local["parts"][0][arithmetic]
    assert local["rows"][1]["ttft_limit"] < plain["rows"][1]["ttft_limit"]
    assert local["rows"][1]["ttft_of_limit"] == pytest.approx(local["rows"][1]["ttft_speedup"] / local["rows"][1]["ttft_limit"])


def test_projection_eager_baseline_runs_eager_attention_in_the_same_rounds(monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    from iam.bench.projection import LayerBench

    eager, calls = modeling_qwen2.eager_attention_forward, []
    monkeypatch.setattr(modeling_qwen2, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k))
    llm, slm = Arch(1, 64, 4, 2, 16, 128, 100, True), Arch(2, 32, 2, 1, 16, 64, 100, True)
    bench = LayerBench(llm, slm, 24, torch.device("cpu"), torch.float32)
    sdpa, mapped, eager_step = bench.prefill_steps(eager=True)
    sdpa(), mapped()
    assert calls == []
    eager_step()
    assert calls == [1] and bench.config._attn_implementation == "sdpa"  # and the layer is back on SDPA
    assert len(bench.prefill_steps(eager=False)) == 2


def test_projection_timings_interleave_their_rounds(monkeypatch):
    from iam.bench.timing import timed

    calls, clock = [], iter(range(100))  # a clock that ticks once a reading: each call lasts one second

    def tick(name: str, extra: int) -> None:
        calls.append(name)
        for _ in range(extra):  # "b" lasts three seconds more: three readings it never sees
            next(clock)

    monkeypatch.setattr("iam.bench.timing.time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    medians = timed([lambda: tick("a", 0), lambda: tick("b", 3)], 3, torch.device("cpu"))
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed ones, taking turns
    assert medians == [1.0, 4.0]


def test_cpu_peak_memory_counts_allocations_whether_or_not_pages_are_touched():
    import time

    from iam.bench.memory import PeakMemory, malloc_in_use

    if malloc_in_use() is None:
        pytest.skip("malloc is not glibc's here: PeakMemory samples RSS")
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.empty(64 << 20, dtype=torch.uint8)  # no page touched: RSS would not grow
        time.sleep(0.05)  # the sampler runs every 5 ms
        del x
    assert 64 << 20 <= mem.bytes < 72 << 20


def test_tensor_peak_counts_live_storages_once():
    from iam.bench.memory import TensorPeak

    x = torch.randn(64, 16)
    with torch.inference_mode(), TensorPeak() as mem:
        scores = x @ x.T  # 16 KiB
        view = scores[:8]  # same storage: not counted again
        del scores, view
        out = torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None], is_causal=True)  # 4 KiB
    assert mem.largest == 64 * 64 * 4 and mem.peak == 64 * 64 * 4  # the scores were freed before the output came
    assert mem.current == out.numel() * 4


def test_mapped_prefill_memory_is_linear_with_no_t_by_t_tensor():
    from iam import MappingConfig
    from iam.bench.measure import memory_scaling

    llm, slm = tiny("qwen2", 4, 64, 4, 2, 0), tiny("qwen2", 2, 32, 2, 1, 1)
    config = MappingConfig(truncation_threshold=32)  # the establishing window stays small next to T
    rows = memory_scaling(llm, slm, [60, 120, 240], [1.0], config, progress=False)
    iam = [r for r in rows if r["ratio"] == 1.0]
    assert [r["tokens"] for r in iam] == [60, 120, 240]
    assert iam[-1]["largest_tensor_bytes"] < iam[-1]["tt_matrix_bytes"]
    assert iam[-1]["largest_tensor_bytes"] <= 2 * iam[-2]["largest_tensor_bytes"]
    assert all(1.8 < r["peak_growth"] < 2.1 for r in iam[1:])
    # the check can fail: an eager LLM materialises every head's T x T probabilities, and its peak grows faster
    llm.config._attn_implementation = "eager"
    eager = memory_scaling(llm, slm, [60, 120, 240], [], config, progress=False)
    assert eager[-1]["largest_tensor_bytes"] >= 4 * eager[-1]["tt_matrix_bytes"] and eager[-1]["peak_growth"] > 3


@pytest.mark.slow
def test_cli_memory_scaling_smoke(tmp_path, capsys):
    assert main(["bench", "--memory-scaling", "--tokens", "24,48", "--ratios", "0.5", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "memory-scaling"
    assert [(r["tokens"], r["ratio"]) for r in result["rows"]] == [(24, 0.0), (24, 0.5), (48, 0.0), (48, 0.5)]
    for key in ("kernels", "peak_tensor_bytes", "largest_tensor_bytes", "tt_matrix_bytes", "kv_bytes", "peak_growth"):
        assert key in result["rows"][-1]


def test_analytic_h2o_composes_with_iam_at_the_papers_configuration(tmp_path, capsys):
    """Paper §4.5: IAM at 0.5 with H2O keeping 80% holds 78.75% x 0.8 = 63% of the LLM alone; H2O alone 80%."""
    argv = ["bench", "--analytic", "--ratios", "0.5", "--eviction", "h2o", "--budget", "0.8", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["kv_ratio"] == pytest.approx(0.8) and rows[1]["kv_ratio"] == pytest.approx(0.63)
    assert rows[1]["tpot_limit"] > rows[0]["tpot_limit"] > 1  # a step reads less KV with eviction, less again with IAM


@pytest.mark.parametrize(
    "family, configs",
    [("qwen2", "iam0.5,iam1.0+w8,llm+h2o@0.5"), ("gemma2", "iam0.5,iam1.0")],  # Gemma: its own windows, no eviction
)
def test_measured_bytes_are_the_caches_own(family, configs):
    """The bench counts no bytes of its own: each IAM row's are ``IAMCache.kv_bytes`` of the same run, and the LLM
    alone's equal what its own ``generate()`` leaves in its ``DynamicCache``."""
    from iam import IAMForCausalLM, MappingConfig
    from iam.bench.measure import measure, random_prompt, run_generate
    from iam.eval.setup import configured, parse_setups

    llm, slm = tiny(family, 4, 64, 4, 2, 0), tiny(family, 2, 32, 2, 1, 1)
    at, setups = Scenario(24, 2, 3), parse_setups(configs)
    rows = measure(llm, slm, setups, at, 1, MappingConfig(), progress=False)
    ids = random_prompt(llm, at.batch, at.prompt, torch.Generator().manual_seed(0))
    _, own = run_generate(llm, ids, at.new_tokens)
    assert rows[0]["kv_bytes"] == sum(t.nbytes for layer in own.layers for t in (layer.keys, layer.values)) > 0
    for setup, row in zip(setups[1:], rows[1:]):
        iam = IAMForCausalLM(llm, slm, configured(MappingConfig(), setup), setup.eviction())
        kv = run_generate(iam, ids, at.new_tokens)[1].kv_bytes()
        assert (row["kv_bytes"], row["kv_llm_bytes"], row["kv_slm_bytes"]) == (kv["total"], kv["llm"], kv["slm"])
        assert row["kv_ratio"] == kv["total"] / rows[0]["kv_bytes"]


def test_the_benchs_own_setups_are_built_from_values():
    """Without --configs the bench builds its Setups from the flags' values; their labels are the ones it wrote as
    text before."""
    from iam.bench.measure import ratio_setups

    assert [s.label for s in ratio_setups([0, 0.5], 8, "h2o", 0.5)] == ["llm", "llm+h2o@0.5", "iam0.5+w8+h2o@0.5"]
    unmapped = ratio_setups([0.3], 0, "h2o", 256, "unmapped", "int8")
    assert [s.label for s in unmapped] == ["llm", "iam0.3+h2o@256:unmapped+int8"]
    assert [s.label for s in ratio_setups([0.3, 0.5])] == ["llm", "iam0.3", "iam0.5"]
