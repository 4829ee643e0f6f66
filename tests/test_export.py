"""``iam export-vllm`` (``iam.export``): the IAM folder vLLM serves, and the pairs it refuses before loading. The
engine itself runs in ``make test-vllm`` (tests/engine)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import forward, prompt, save_tiny_pair, word_tokenizer
from iam import IAMForCausalLM, MappingConfig
from iam.cli import main
from iam.core import checks as core_checks
from iam.core.fixed import FixedMapping, read_head_mapping
from iam.export import export_vllm
from iam.models.loading import read_configs


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text("Keys and values of every request live in a paged cache. " * 20)
    return path


def export(pair_folders, out, *extra) -> int:
    llm, slm = pair_folders
    return main(["export-vllm", "--llm", llm, "--slm", slm, "--out", str(out), "--tokens", "48", "--windows", "2", *extra])


def test_exported_folder_round_trips(family, text, tmp_path):
    pair_folders = save_tiny_pair(tmp_path, family=family)
    out = tmp_path / "iam"
    assert export(pair_folders, out, "--ratio", "0.5", "--text", str(text)) == 0
    config = json.loads((out / "config.json").read_text())
    architecture = {"qwen2": "IAMQwen2ForCausalLM", "llama": "IAMLlamaForCausalLM"}[family]
    assert config["architectures"] == [architecture] and config["num_hidden_layers"] == 4
    iam = config["iam"]
    assert iam["mapped_layers"] == [2, 3] and iam["slm"]["num_hidden_layers"] == 2 and iam["pair"] == list(pair_folders)
    assert (out / "model.safetensors").resolve() == (tmp_path / "llm" / "model.safetensors").resolve()
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".iam*"))  # no temporary folder left
    llm, slm = read_configs(*pair_folders)
    fixed = read_head_mapping(out / iam["head_mapping"], llm, slm)
    assert fixed.plan == {2: (0, 1), 3: (0, 1)} and fixed.blend == 1 and fixed.source["calibration"] == [str(text)]
    # the folder's mapping loads into IAMForCausalLM and is the one it runs
    model = IAMForCausalLM.from_pretrained(*pair_folders, head_mapping=str(out / "head_mapping.json"), progress=False)
    mapping = forward(model, prompt(30)).cache.mapping
    assert torch.equal(mapping.head_mapping[0, :, :, 0], torch.tensor([[s for ((s, _, _),) in fixed.borrow[i]] for i in (2, 3)]))


def test_export_of_a_given_mapping_keeps_it(pair_folders, tmp_path):
    """A mapping established on one sequence (``FixedMapping.of``), exported as it is."""
    llm, slm = read_configs(*pair_folders)
    model = IAMForCausalLM.from_pretrained(*pair_folders, ratio=0.5, strategy="back", blend=1, progress=False)
    fixed = FixedMapping.of(forward(model, prompt(40)).cache.mapping, llm, slm)
    fixed.save(tmp_path / "map.json")
    export_vllm(*pair_folders, tmp_path / "iam", MappingConfig(head_mapping=str(tmp_path / "map.json")))
    assert read_head_mapping(tmp_path / "iam" / "head_mapping.json", llm, slm).borrow == fixed.borrow
    # and from the command line
    out = tmp_path / "cli"
    assert (
        main(
            [
                "export-vllm",
                "--llm",
                pair_folders[0],
                "--slm",
                pair_folders[1],
                "--head-mapping",
                str(tmp_path / "map.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert read_head_mapping(out / "head_mapping.json", llm, slm).borrow == fixed.borrow


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights load."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the pair was refused")

    monkeypatch.setattr(core_checks, "load_pair", refuse)


def test_another_architecture_is_refused_before_loading(tmp_path, text, no_loading, capsys):
    folders = save_tiny_pair(tmp_path, family="qwen3")
    assert export(folders, tmp_path / "iam", "--text", str(text)) == 2
    assert "serves ['llama', 'qwen2'] pairs, not 'qwen3'" in capsys.readouterr().err
    assert not (tmp_path / "iam").exists()


def test_a_tokenizer_mismatch_is_refused_before_loading(pair_folders, tmp_path, text, no_loading, capsys):
    word_tokenizer().save_pretrained(pair_folders[1])  # the SLM's vocabulary size stays 97, its tokenizer differs
    assert export(pair_folders, tmp_path / "iam", "--text", str(text)) == 2
    assert "tokenizers differ" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "says"), [(["--layers", "1:0,3"], "KV groups of layers [1]"), (["--blend", "2"], "blend 2")])
def test_what_the_vllm_model_does_not_serve_is_refused_before_loading(
    pair_folders, tmp_path, text, no_loading, capsys, flags, says
):
    assert export(pair_folders, tmp_path / "iam", "--text", str(text), *flags) == 2
    assert says in capsys.readouterr().err
