"""``make gpu-check`` (iam.bench.gpucheck): its arguments and its JSON summary on the CPU with the tiny pair; the
real run, on the shipped pair and CUDA, is marked ``gpu``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_pair, tiny
from iam.bench import gpucheck

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pair")
    save_tiny_pair(folder)
    return folder


def test_the_summary_on_a_cpu_has_every_check_and_setting(saved_pair, tmp_path, capsys):
    pair = ["--llm", str(saved_pair / "llm"), "--slm", str(saved_pair / "slm"), "--device", "cpu", "--dtype", "float32"]
    assert gpucheck.main([*pair, "--tokens", "24", "--new-tokens", "2", "--json", str(tmp_path / "s.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "s.json").read_text())
    assert {"device", "gpus", "dtype", "llm", "slm", "checks", "timings", "multi_gpu", "ok", "seconds"} <= printed.keys()
    assert printed["ok"] and printed["multi_gpu"] == {"skipped": "not on CUDA"}
    twin = printed["checks"]["identity_twin"]
    assert twin["same_tokens"] and twin["max_abs_logit_diff"] < 1e-4
    assert printed["checks"]["ratio0_equals_generate"] == {"same_tokens": True, "ok": True}
    assert [(r["setting"], r["tokens"]) for r in printed["timings"]] == [(s.label, 24) for s in gpucheck.SETTINGS]
    for row in printed["timings"]:
        # on a CPU the peak is sampled every 5 ms, which a tiny model's run can finish inside: a count, maybe 0
        assert row["ttft_s"] > 0 and row["tpot_s"] > 0 and isinstance(row["peak_bytes"], int)
        assert (row["kv_bytes"] is None) == (row["setting"] == "llm")
    assert printed["timings"][0]["ttft_ratio"] == 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "0"], "takes comma-separated whole numbers >= 1"),
        (["--new-tokens", "x"], "takes comma-separated whole numbers >= 1"),
        (["--dtype", "int8"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpucheck.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_device_exits_2_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(gpucheck, "load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    assert gpucheck.main(["--device", "nosuch"]) == 2
    assert "gpu-check: error: unknown device 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["{file}/s.json", "{folder}"], ids=["under a file", "a folder"])
def test_an_unwritable_json_path_exits_2_before_any_check(where, tmp_path, monkeypatch, capsys):
    """It ran every check, then died with a traceback writing the summary."""
    monkeypatch.setattr(gpucheck, "load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    (tmp_path / "file").write_text("")
    path = where.format(file=tmp_path / "file", folder=tmp_path)
    assert gpucheck.main(["--device", "cpu", "--json", path]) == 2
    assert re.search(r"gpu-check: error: --json .* (is not a writable folder|is a folder)", capsys.readouterr().err)


def test_the_two_gpu_device_map_splits_the_layers():
    config = tiny("qwen2", 4, 64, 4, 2, seed=0).config
    device_map = gpucheck.two_device_map(config)
    assert [device_map[f"model.layers.{i}"] for i in range(4)] == [0, 0, 1, 1]
    assert (device_map["model.embed_tokens"], device_map["lm_head"]) == (0, 1)


def test_make_gpu_check_runs_the_script():
    dry = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-m iam.bench.gpucheck --json results/gpu-check.json" in dry


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_on_the_shipped_pair(tmp_path, capsys):
    code = gpucheck.main(["--json", str(tmp_path / "gpu-check.json")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["ok"], json.dumps(summary["checks"], indent=1)
    assert summary["seconds"] < 300
