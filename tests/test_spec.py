"""The resolved run spec (``iam.core.resolution.Resolved``): what it carries, built and checked once per model, and
what it answers for the model, its cache and its mapped layers."""

from __future__ import annotations

import pytest

from conftest import forward, prompt
from iam import IAMForCausalLM, MappingConfig
from iam.core.config import mapping_threshold
from iam.core.eviction import H2O, KVzip, SnapKV, StreamingLLM
from iam.core.kernels import Kernels
from iam.core.resolution import resolve


def test_the_spec_carries_the_eviction_the_window_and_the_kernels(pair):
    llm, slm = pair
    policy, kernels = StreamingLLM(budget=20), Kernels(flex_from=None)
    model = IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, strategy="back", local_window=8), policy, kernels)
    spec = model.resolved
    assert (spec.eviction, spec.kernels, spec.local, spec.partial) == (policy, kernels, (4, 8), False)
    assert (model.eviction, model.kernels) == (policy, kernels)
    out = forward(model, prompt(40))
    assert out.cache.mapping.summary()["kernels"] == kernels.summary()
    assert not hasattr(out.cache, "eviction")  # the cache holds tensors; the policy is the spec's


def test_the_spec_says_which_layers_evict(pair):
    llm, slm = pair
    unmapped = resolve(MappingConfig(ratio=0.5), llm.config, slm.config, H2O(budget=0.5, scope="unmapped"))
    assert unmapped.partial and not unmapped.evicts(2, {2: (0, 1)}) and unmapped.evicts(0, {2: (0, 1)})
    assert unmapped.evicts(2, None)  # before the mapping every layer follows the kept set
    every = resolve(MappingConfig(ratio=0.5), llm.config, slm.config, H2O(budget=0.5))
    assert not every.partial and every.evicts(2, {2: (0, 1)})
    assert not resolve(MappingConfig(ratio=0.5), llm.config, slm.config).evicts(0, None)


def test_ratio_zero_is_the_llm_alone_in_one_property(tmp_path, pair):
    llm, slm = pair
    assert not MappingConfig(ratio=0.0).maps and MappingConfig(ratio=0.1).maps
    assert MappingConfig(ratio=0.0, layers=[1]).maps and not MappingConfig(ratio=0.0, layers=[]).maps
    assert resolve(MappingConfig(ratio=0.0, local_window=8), llm.config, slm.config).local is None
    head_mapping = tmp_path / "heads.json"
    head_mapping.write_text("{}")
    assert MappingConfig(ratio=0.0, head_mapping=str(head_mapping)).maps  # the file's plan maps, whatever the ratio
    assert mapping_threshold([MappingConfig(ratio=0.0, head_mapping=str(head_mapping), establish_threshold=9)]) == 9
    assert mapping_threshold([MappingConfig(ratio=0.0, establish_threshold=9)]) == 0


def test_a_policy_says_which_queries_score_it():
    assert SnapKV(window=5).observed_queries() == 5
    assert H2O().observed_queries() is None and KVzip().observed_queries() is None
    assert StreamingLLM(scope="unmapped").partial and not StreamingLLM().partial


def test_the_window_reaches_eviction_from_the_spec(pair):
    """With a local window the exact window's sinks and latest slots are kept by eviction: the spec gives them, not a
    cache layer."""
    llm, slm = pair
    model = IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, strategy="back", local_window=8), StreamingLLM(budget=12, sinks=0))
    kept = forward(model, prompt(40)).cache.kept
    # the policy alone would keep the latest 12; the window keeps its 4 sinks and its latest 8
    assert kept.positions[kept.valid].tolist() == [0, 1, 2, 3, *range(32, 40)]


@pytest.mark.parametrize("scope", ["all", "unmapped"])
def test_unmapped_scope_protects_nothing_in_the_mapped_layers(pair, scope):
    llm, slm = pair
    model = IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, strategy="back", local_window=8), H2O(budget=24, scope=scope))
    assert model._protected == (None if scope == "unmapped" else (4, 8))


def test_the_loader_passes_the_users_calibrations_and_a_plain_config_reads_none(pair_folders, tmp_path, monkeypatch):
    """``from_pretrained`` and the command line look in ``$IAM_CACHE/calibration`` (the loader reads it); a config
    built in code reads the shipped orders only, whatever the environment."""
    from iam.cli import build_parser
    from iam.cli.common import mapping_config
    from iam.core.calibration import write_order

    monkeypatch.setenv("IAM_CACHE", str(tmp_path / "cache"))
    llm_folder, slm_folder = pair_folders
    plain = IAMForCausalLM.from_pretrained(llm_folder, slm_folder, ratio=0.5, progress=False)
    assert list(plain.planned) == [2, 3]  # nothing stored: "back"
    write_order(plain.llm.config, plain.slm.config, [1, 3, 0, 2], {}, {}, tmp_path / "cache" / "calibration")
    loaded = IAMForCausalLM.from_pretrained(llm_folder, slm_folder, ratio=0.5, progress=False)
    assert list(loaded.planned) == [1, 3]
    assert list(IAMForCausalLM(loaded.llm, loaded.slm, MappingConfig(ratio=0.5)).planned) == [2, 3]
    args = build_parser().parse_args(["generate", "--llm", llm_folder, "--slm", slm_folder, "--prompt", "x"])
    assert mapping_config(args, 0.5).calibrations == str(tmp_path / "cache" / "calibration")
