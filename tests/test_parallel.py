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

from conftest import char_tokenizer, forward, prompt, tiny
from iam import IAMForCausalLM
from iam.core.cache import IAMCache
from iam.models import loading

TESTS = Path(__file__).resolve().parent
CASES = ["plain", "kv-groups", "blend", "local-window", "similar", "int8-slm", "eviction", "beam-search", "left-padded"]


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory) -> Path:
    """The tiny Qwen2 pair (4 heads, 2 KV heads: one KV group per rank at 2 processes), saved with a tokenizer."""
    folder = tmp_path_factory.mktemp("pair")
    for name, model in (("llm", tiny("qwen2", 4, 64, 4, 2, seed=0)), ("slm", tiny("qwen2", 2, 32, 2, 1, seed=1))):
        model.save_pretrained(folder / name)
        char_tokenizer().save_pretrained(folder / name)
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
    ],
)
def test_placements_that_cannot_work_are_refused_before_loading(saved_pair, monkeypatch, placement, env, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=message):
        IAMForCausalLM.from_pretrained(saved_pair / "llm", saved_pair / "slm", progress=False, **placement)
