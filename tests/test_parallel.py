"""IAM with the LLM spread over devices: transformers' tensor parallelism under ``torchrun`` (2 processes, gloo, one
thread each, on the CPU; the checks run in tests/tp_checks.py in one launch), accelerate's dispatch with a layer
offloaded to disk, and the combinations refused before any weights load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import forward, prompt, save_tiny_pair
from iam import IAMForCausalLM, cli
from iam.core.cache import IAMCache
from iam.models import loading
from iam.models.presets import load_arch

TESTS = Path(__file__).resolve().parent
GPUS = torch.cuda.device_count()  # a GPU index past the last one
CASES = ["plain", "kv-groups", "blend", "local-window", "similar", "int8-slm", "eviction", "beam-search", "left-padded"]


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory) -> Path:
    """The tiny Qwen2 pair (4 heads, 2 KV heads: one KV group per rank at 2 processes), saved with a tokenizer."""
    folder = tmp_path_factory.mktemp("pair")
    save_tiny_pair(folder)
    words = "the of and to in is was for on as with by he at from his an were are which this be or had it".split()
    (folder / "text.txt").write_text(" ".join(words[(7 * i) % len(words)] for i in range(200)))
    return folder


def child_env() -> dict[str, str]:
    """The environment of the torchrun processes: this checkout's sources first (also in a fresh clone in CI), one
    thread per process."""
    path = [str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tp_reports(saved_pair, tmp_path_factory) -> list[dict]:
    """Every rank's report of tests/tp_checks.py, run once for the module."""
    out = tmp_path_factory.mktemp("tp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run(
        [*command, str(TESTS / "tp_checks.py"), str(saved_pair), str(out)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_matches_one_process(tp_reports, case):
    for report in tp_reports:
        result = report["cases"][case]
        assert "error" not in result, f"rank {report['rank']}: {result.get('error')}"
        assert result["max_diff"] < 1e-4, (report["rank"], result)
        assert result["same_tokens"] and result["same_mapping"] and result["same_kept"], (report["rank"], result)


def test_a_head_map_read_at_another_ranks_heads_changes_the_logits(tp_reports):
    """The comparison above can tell a wrongly sliced head map: each rank reading the other's part of it."""
    for report in tp_reports:
        result = report["cases"]["misread-map"]
        assert result["max_diff"] > 1e-2 and not result["same_tokens"], result


def test_the_llm_is_sharded_and_the_slm_whole_and_a_sharded_slm_refused(tp_reports):
    for report in tp_reports:
        assert report["llm_v_rows"] * 2 == report["llm_v_rows_whole"]
        assert not report["slm_sharded"]
        assert "the SLM is sharded" in report["sharded_slm_refused"]


def test_cli_under_torchrun_only_rank_0_prints_and_writes_and_matches_one_process(tp_reports, saved_pair, tmp_path, capsys):
    from tp_checks import cli_commands

    ranks = [report["cli"] for report in tp_reports]
    for name in ("perplexity", "bench"):
        assert ranks[0][name]["code"] == ranks[1][name]["code"] == 0
        assert ranks[0][name]["files"] and ranks[0][name]["stdout"]
        assert ranks[1][name] == {"code": 0, "stdout": "", "files": []}
    alone = {}
    for name, argv in cli_commands(saved_pair).items():
        assert cli.main([*argv, "--out", str(tmp_path / name)]) == 0
        alone[name] = json.loads(capsys.readouterr().out)
    tp = {name: json.loads(ranks[0][name]["stdout"]) for name in ("perplexity", "bench")}
    assert [r["ppl"] for r in tp["perplexity"]["rows"]] == pytest.approx(
        [r["ppl"] for r in alone["perplexity"]["rows"]], rel=1e-5
    )
    assert tp["perplexity"]["rows"][1]["mapped_layers"] == alone["perplexity"]["rows"][1]["mapped_layers"] == [2, 3]
    for sharded, whole in zip(tp["bench"]["rows"], alone["bench"]["rows"]):  # KV bytes are rank 0's: half the LLM's heads
        assert (sharded["kv_llm_bytes"] * 2, sharded["kv_slm_bytes"]) == (whole["kv_llm_bytes"], whole["kv_slm_bytes"])


def test_readme_generate_under_torchrun_matches_one_process(saved_pair, capsys):
    """The README's example, on the tiny pair: one JSON printed (rank 0), the text of the run in one process."""
    argv = ["generate", "--llm", str(saved_pair / "llm"), "--slm", str(saved_pair / "slm"), "--ratio", "0.5"]
    argv += ["--establish-threshold", "8", "--prompt", "the cat sat on the mat and", "--max-new-tokens", "8", "--json"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "iam"]
    run = subprocess.run([*command, *argv, "--tp"], env=child_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert cli.main(argv) == 0
    alone = json.loads(capsys.readouterr().out)
    sharded = json.loads(run.stdout)  # one JSON document: rank 1 printed nothing
    assert sharded["text"] == alone["text"] and sharded["mapped_layers"] == alone["mapped_layers"] == [2, 3]


def test_cli_placement_flags_that_cannot_work_exit_2(saved_pair, monkeypatch, capsys):
    pair = ["--llm", str(saved_pair / "llm"), "--slm", str(saved_pair / "slm")]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    cases = [
        (["generate", *pair, "--prompt", "x", "--tp"], "launch with `torchrun"),
        (["generate", *pair, "--prompt", "x", "--tp", "--device-map", "auto"], "cannot be combined"),
        (["generate", *pair, "--prompt", "x", "--tp", "4"], "--tp 4 differs from the 1 processes"),
        (["generate", *pair, "--prompt", "x", "--max-memory", "cpu=1GiB"], "apply to a device_map"),
        (["bench", *pair, "--projection", "--tp"], "only --analytic takes --tp N"),
        (["bench", "--analytic", "--tp"], "takes the number of devices"),
        (["bench", "--analytic", "--tp", "3"], "--tp 3 must divide the LLM's 64 attention heads and 8 KV heads"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        cli.main(["generate", *pair, "--prompt", "x", "--max-memory", "lots"])
    assert "--max-memory takes device=size pairs" in capsys.readouterr().err


def test_analytic_tp_plan_splits_the_llm_and_replicates_the_slm(tmp_path, capsys):
    plans = {}
    for tp in (4, 8):
        argv = ["bench", "--analytic", "--full-size", "--tp", str(tp), "--ratios", "0.5", "--json", "--out", str(tmp_path)]
        assert cli.main(argv) == 0
        plans[tp] = json.loads(capsys.readouterr().out)["per_device"]
    slm = load_arch("qwen2-0.5b")
    for alone, mapped in plans.values():
        assert (alone["ratio"], mapped["ratio"], mapped["mapped_layers"]) == (0.0, 0.5, 40)
        assert mapped["weights_gb"] - alone["weights_gb"] == pytest.approx(slm.params * 2 / 1e9)  # the SLM whole, each device
    assert plans[4][0]["kv_gb"] == pytest.approx(2 * plans[8][0]["kv_gb"])  # the LLM's KV heads split
    llm = load_arch("qwen2-72b")
    embed = llm.vocab * llm.hidden * 2 / 1e9
    assert plans[4][0]["weights_gb"] - embed == pytest.approx(2 * (plans[8][0]["weights_gb"] - embed))


def test_device_map_with_a_layer_on_disk_matches_one_device(saved_pair, tmp_path):
    llm, slm = saved_pair / "llm", saved_pair / "slm"
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i == 3 else "cpu" for i in range(4)}
    mapping = {"layers": [1, 3], "establish_threshold": 8, "progress": False}
    dispatched = IAMForCausalLM.from_pretrained(llm, slm, device_map=device_map, offload_folder=tmp_path, **mapping)
    whole = IAMForCausalLM.from_pretrained(llm, slm, **mapping)
    assert dispatched.llm.hf_device_map["model.layers.3"] == "disk"
    assert dispatched.llm.model.layers[3].self_attn.v_proj.weight.device.type == "meta"  # loaded only while it runs
    assert dispatched.slm.device.type == "cpu"
    ids = prompt(20)
    assert (forward(dispatched, ids).logits - forward(whole, ids).logits).abs().max() < 1e-5
    settings = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(dispatched.generate(ids, **settings), whole.generate(ids, **settings))


def test_an_offload_folder_that_is_a_file_is_refused_before_loading(saved_pair, tmp_path, monkeypatch, capsys):
    """It gave a FileExistsError traceback."""
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    argv = ["generate", "--llm", str(saved_pair / "llm"), "--slm", str(saved_pair / "slm"), "--prompt", "x"]
    assert cli.main([*argv, "--device-map", "auto", "--offload-folder", str(tmp_path / "file")]) == 2
    assert f"--offload-folder '{tmp_path / 'file'}' is a file: give a folder" in capsys.readouterr().err
    assert cli.main([*argv, "--device-map", "auto", "--max-memory", f"{GPUS}=1GiB,cpu=1GiB"]) == 2
    assert f"--max-memory names {GPUS}: device 'cuda:{GPUS}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "placement",
    [{"device_map": {"": "disk"}}, {"device_map": "auto", "max_memory": {"cpu": "1KiB"}}],
    ids=["all on disk", "auto below one layer"],
)
def test_an_llm_whose_first_weights_wait_on_disk_runs_on_its_execution_device(saved_pair, tmp_path, placement):
    """Inputs went to ``llm.device``, ``meta`` there: 'Tensor.item() cannot be called on meta tensors'."""
    llm, slm = saved_pair / "llm", saved_pair / "slm"
    mapping = {"layers": [1, 3], "establish_threshold": 8, "progress": False}
    dispatched = IAMForCausalLM.from_pretrained(llm, slm, offload_folder=tmp_path, **placement, **mapping)
    whole = IAMForCausalLM.from_pretrained(llm, slm, **mapping)
    assert dispatched.llm.device.type == "meta" and dispatched.device.type == "cpu"
    ids = prompt(20)
    assert (forward(dispatched, ids).logits - forward(whole, ids).logits).abs().max() < 1e-5
    settings = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(dispatched.generate(ids, **settings), whole.generate(ids, **settings))


def test_kv_bytes_by_device_splits_the_total(pair):
    model = IAMForCausalLM.from_pair(*pair)
    cache: IAMCache = forward(model, prompt(30)).cache
    assert cache.kv_bytes_by_device() == {"cpu": cache.kv_bytes()["total"]}


@pytest.mark.parametrize(
    ("placement", "env", "message"),
    [
        ({"tp_plan": "auto", "device_map": "auto"}, {"WORLD_SIZE": "2"}, "cannot be combined"),
        (
            {"tp_plan": "auto"},
            {"WORLD_SIZE": "3"},
            r"size 3 must divide the LLM's 4 attention heads and 2 KV heads: use one of \[1, 2\] processes",
        ),
        ({"tp_plan": "auto"}, {}, "launch with `torchrun"),
        ({"max_memory": {"cpu": "1GiB"}}, {}, "apply to a device_map"),
        ({"offload_folder": "off"}, {}, "apply to a device_map"),
        ({"slm_device": "cpu"}, {}, "slm_device applies to a device_map"),
        ({"device_map": "auto", "device": "meta"}, {}, "leave it out"),
        # devices this machine lacks gave AssertionError or RuntimeError tracebacks once the weights loaded
        ({"device_map": {"": GPUS}}, {}, rf"`device_map` names {GPUS}: device 'cuda:{GPUS}' (is not available|does not exist)"),
        ({"device_map": {"": "mps"}}, {}, r"`device_map` names 'mps': device 'mps' is not available here"),
        ({"device_map": "mps"}, {}, r"`device_map` names 'mps'"),
        ({"device_map": "auto", "max_memory": {GPUS: "1GiB"}}, {}, rf"`max_memory` names {GPUS}: device 'cuda:{GPUS}'"),
        ({"device_map": "auto", "max_memory": {"mps": "1GiB"}}, {}, r"`max_memory` names 'mps'"),
        ({"device_map": "auto", "slm_device": f"cuda:{GPUS}"}, {}, rf"`slm_device` names 'cuda:{GPUS}'"),
    ],
)
def test_placements_that_cannot_work_are_refused_before_loading(saved_pair, monkeypatch, placement, env, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=message):
        IAMForCausalLM.from_pretrained(saved_pair / "llm", saved_pair / "slm", progress=False, **placement)
