"""Fuzzing ``MappingConfig``, the eviction policy, the dtype and the inputs of ``forward``/``generate`` on the tiny
pairs: every draw either runs and matches its references (each row of a batch as run alone; ratio 0 without eviction
as the LLM alone; another wrapper's cache refused, an equal wrapper's accepted) or raises ``ValueError``. Then the
configurations written as text (each runs what its label says, or is refused naming its part) and the retrieval's
progress file (however damaged, no whole recorded answer is lost)."""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import FAMILIES, VOCAB, forward, left_pad, tiny
from iam import STRATEGIES, IAMForCausalLM, MappingConfig
from iam.core.eviction import POLICIES, make_policy, parse_budget
from iam.core.selection import units_for_ratio
from iam.core.similarity import METRICS
from iam.eval import retrieval
from iam.eval.setup import build, checked_configs, parse_setup

PAIRS = {
    (family, dtype): tuple(m.to(dtype) for m in (tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 2, 1, seed=1)))
    for family in sorted(FAMILIES)
    for dtype in (torch.float32, torch.bfloat16)
}
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 5e-2)}  # against a row's solo run, and the LLM alone


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` about five times in six, so that most draws run to the end."""
    return st.sampled_from([False] * 5 + [True]).flatmap(lambda bad: invalid if bad else valid)


units = st.one_of(st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 1)))  # the tiny LLMs: 4 layers x 2 KV
config_kwargs = st.fixed_dictionaries(
    {},
    optional={
        "ratio": mostly(st.floats(0, 1), st.sampled_from([-0.1, 1.5, float("nan"), "half", None])),
        "strategy": mostly(st.sampled_from(sorted(STRATEGIES)), st.just("middle")),
        "layers": mostly(
            st.none() | st.lists(units, max_size=4, unique_by=lambda u: u if isinstance(u, int) else u[0]),
            st.lists(st.one_of(st.integers(-1, 5), st.tuples(st.integers(-1, 5), st.integers(-1, 2))), max_size=4),
        ),
        "metric": mostly(st.sampled_from(sorted(METRICS)), st.just("dot")),
        "blend": mostly(st.none() | st.integers(1, 4), st.sampled_from([-1, 0, 5, 9, True])),
        "establish_threshold": mostly(st.integers(2, 40), st.integers(0, 1)),
        "truncation_threshold": mostly(st.integers(2, 60), st.integers(0, 1)),
        "slm_cache": mostly(st.sampled_from(["native", "int8"]), st.just("fp8")),
        "local_window": mostly(st.integers(0, 12), st.sampled_from([-1, 2.5])),
        "local_sinks": mostly(st.none() | st.integers(0, 4), st.just(-1)),
    },
)
policies = st.none() | st.tuples(
    st.sampled_from(sorted(POLICIES)), mostly(st.sampled_from([None, 0.5, 0.9, 1.0, 16, 40]), st.sampled_from([0.0, -3, 1.5, 2]))
)
others = st.sampled_from([None, None, "same settings", "other settings"])  # a second wrapper, whose cache is passed


@st.composite
def batches(draw) -> tuple[list[torch.Tensor], str | None]:
    """Prompts of a left-padded batch (rarely an empty one, or one beyond the 256 positions), and rarely a flaw."""
    lengths = draw(st.lists(mostly(st.integers(1, 120), st.sampled_from([0, 257])), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    if draw(st.booleans()):  # a batch holding one prompt twice
        prompts.append(prompts[0])
    return prompts, draw(mostly(st.none(), st.sampled_from(sorted(FLAWS))))


FLAWS = {  # what a caller gets wrong, applied to (ids, mask)
    "token id -1": lambda ids, mask: (ids.index_fill(1, torch.tensor([ids.shape[1] - 1]), -1), mask),
    "token id = vocab size": lambda ids, mask: (ids.index_fill(1, torch.tensor([ids.shape[1] - 1]), VOCAB), mask),
    "1-D input": lambda ids, mask: (ids[0], mask[0]),
    "int32 ids": lambda ids, mask: (ids.int(), mask),
    "hole in the mask": lambda ids, mask: (ids, mask.index_fill(1, torch.tensor([ids.shape[1] - 1]), 0)),
    "mask of 2s": lambda ids, mask: (ids, mask * 2),
}


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def mapped_from(length: int, threshold: float, forwards: int) -> int:
    """The forward (0: the prefill, k: the k-th decode step) from which a sequence of ``length`` tokens is mapped:
    the one where its context reaches ``threshold``; ``forwards`` if none of them does."""
    return int(min(max(0, threshold - length), forwards))


def run(
    family: str,
    kwargs: dict,
    prompts: list[torch.Tensor],
    flaw: str | None,
    new: int,
    dtype: torch.dtype = torch.float32,
    policy: tuple | None = None,
    other: str | None = None,
) -> None:
    """Forward and greedy generate on the left-padded batch, then the references. A batch is mapped (and evicts)
    from the forward where its shortest context reaches ``establish_threshold``, so a row equals its solo run when
    that is the forward its solo run is mapped from too (always, when nothing is mapped). Greedy tokens are compared
    in float32 only: in bfloat16 a row's logits match within the dtype's tolerance, and a near tie may go either
    way."""
    llm, slm = PAIRS[family, dtype]
    config = MappingConfig(**kwargs)
    eviction = make_policy(*policy) if policy else None
    model = IAMForCausalLM(llm, slm, config, eviction)
    ids, mask = left_pad(prompts)
    if flaw is not None:
        ids, mask = FLAWS[flaw](ids, mask)
    results = []
    for call in (lambda: forward(model, ids, mask).logits, lambda: greedy(model, ids, mask, new)):
        try:
            results.append(call())
        except ValueError as err:
            results.append(err)
    assert len({isinstance(r, ValueError) for r in results}) == 1, f"forward and generate disagree: {results}"
    if isinstance(results[0], ValueError):
        raise results[0]
    logits, tokens = results
    if other is not None:  # another wrapper's cache: refused by name, unless it was made with equal settings
        second = IAMForCausalLM(llm, slm, config, copy.deepcopy(eviction))
        if other == "other settings":
            second = IAMForCausalLM(llm, slm, replace(config, establish_threshold=config.establish_threshold + 1), eviction)
            with pytest.raises(ValueError, match="this cache was made for another mapping config"):
                forward(model, ids, mask, cache=second.new_cache())
        else:
            torch.testing.assert_close(forward(model, ids, mask, cache=second.new_cache()).logits, logits, atol=0, rtol=0)
    tolerance, alone_tolerance = TOLERANCE[dtype]
    nothing_mapped = model.resolved.n_mapped == 0
    threshold = float("inf") if nothing_mapped else model.mapping_config.establish_threshold
    shortest = min(len(p) for p in prompts)
    for i, p in enumerate(prompts):
        ones = torch.ones(1, len(p), dtype=torch.long)
        if mapped_from(len(p), threshold, 1) == mapped_from(shortest, threshold, 1):
            alone = forward(model, p[None], ones).logits[0]
            torch.testing.assert_close(logits[i, ids.shape[1] - len(p) :], alone, atol=tolerance, rtol=tolerance)
        if dtype == torch.float32 and mapped_from(len(p), threshold, new) == mapped_from(shortest, threshold, new):
            assert torch.equal(tokens[i, ids.shape[1] :], greedy(model, p[None], ones, new)[0, len(p) :]), f"row {i}"
    if nothing_mapped and eviction is None:  # ratio 0 (or no units): the LLM alone
        torch.testing.assert_close(logits, forward(llm, ids, mask).logits, atol=alone_tolerance, rtol=alone_tolerance)
        if dtype == torch.float32:
            assert torch.equal(tokens, greedy(llm, ids, mask, new))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine the thread pool's waits dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    kwargs=config_kwargs,
    batch=batches(),
    new=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    policy=policies,
    other=others,
)
@example(
    family="qwen2", kwargs={}, batch=([torch.arange(1, 30)], "1-D input"), new=2, dtype=torch.float32, policy=None, other=None
)
@example(  # the window in bfloat16 (was a dtype error), SnapKV's ties in a batch, and an equal wrapper's cache
    family="llama",
    kwargs={"layers": [1, (2, 0)], "local_window": 6},
    batch=([torch.arange(1, 41), torch.arange(3, 25)], None),
    new=3,
    dtype=torch.bfloat16,
    policy=None,
    other="same settings",
)
@example(
    family="qwen2",
    kwargs={"ratio": 0.5, "blend": 2},
    batch=([torch.arange(1, 61), torch.arange(7, 31), torch.arange(7, 31)], None),
    new=3,
    dtype=torch.float32,
    policy=("snapkv", 16),
    other="other settings",
)
def test_every_config_and_input_runs_as_its_references_or_raises_value_error(family, kwargs, batch, new, dtype, policy, other):
    try:
        run(family, kwargs, *batch, new, dtype, policy, other)
        event("ran, matching its references")
    except ValueError as err:
        event(f"ValueError: {str(err)[:40]}")


@pytest.mark.parametrize("kwargs", [{"ratio": 0.5, "blend": 2}, {"ratio": 0}, {"layers": [1, (2, 0)], "establish_threshold": 24}])
def test_valid_draws_run_to_their_references(kwargs):
    """The fuzzed test accepts a ValueError; these draws must not raise one."""
    run("llama", kwargs, [torch.arange(1, 30), torch.arange(5, 27), torch.arange(40, 62)], None, 3)


# ---- configurations written as text (``iam.eval.setup``) ---------------------------------------------------------

PARTS = {  # each part's kind, or None for a part that is refused however it is combined
    **{p: "mapping" for p in ("llm", "iam0.5", "iam1.0", "iam0.3", "iam0.13", "iam0.1")},
    **{p: "window" for p in ("w4", "w8")},
    **{p: "blend" for p in ("b1", "b2")},
    **{p: "eviction" for p in ("h2o@0.5", "snapkv@0.8", "streaming@0.7:unmapped", "snapkv@24", "h2o@0.9:all")},
    "int8": "cache",
    **{p: None for p in ("iam0", "iam1.5", "iamx", "w0", "b0", "b9", "q3", "", "lru@0.5", "h2o@0", "h2o@0.5:some", "llm+")},
}
"""Parts of a configuration's text, each of the kind it gives (``parse_setup``), or ``None`` where it is refused."""


def expected(parts: list[str]) -> dict | None:
    """What a configuration of ``parts`` must run, read off its parts here; ``None`` where it must be refused: a bad
    part, a kind given twice, or a window without mapped layers."""
    kinds = [PARTS[p] for p in parts]
    if None in kinds or len(set(kinds)) < len(kinds):
        return None
    given = dict(zip(kinds, parts))
    ratio = float(given.get("mapping", "llm").removeprefix("iam").replace("llm", "0"))
    if ("window" in given or "blend" in given) and not ratio:
        return None
    policy = None
    if "eviction" in given:
        name, _, rest = given["eviction"].partition("@")
        budget, _, scope = rest.partition(":")
        policy = make_policy(name, parse_budget(budget), scope or "all")
    window = int(given.get("window", "w0")[1:])
    blend = int(given["blend"][1:]) if "blend" in given else None
    return {
        "ratio": ratio,
        "local_window": window,
        "blend": blend,
        "llm_cache": "int8" if "cache" in given else "native",
        "policy": policy,
    }


@st.composite
def configurations(draw) -> list[str]:
    """A mapping part and some of the other kinds, in any order; rarely one more part, bad or of a kind given."""
    kinds = {
        kind: sorted(p for p, k in PARTS.items() if k == kind) for kind in ("mapping", "window", "blend", "eviction", "cache")
    }
    parts = [draw(st.sampled_from(kinds[k])) for k in kinds if k == "mapping" or draw(st.booleans())]
    parts = draw(st.permutations(parts))
    if draw(mostly(st.just(False), st.just(True))):
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(sorted(PARTS))))
    return parts


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(parts=configurations())
@example(parts=["iam0.5", "w8", "w4"])  # ran w4
@example(parts=["iam0.5", "llm"])  # ran the LLM alone under an IAM label
@example(parts=["iam0.5", "h2o@0.5", "snapkv@0.8"])  # ran the last eviction
def test_a_configuration_runs_what_its_label_says_or_is_refused_naming_its_part(parts):
    """Parsed, a configuration runs the mapping, window, cache and eviction its parts say (on the tiny pair, through
    ``checked_configs`` and ``build``); else a ``ValueError`` names the configuration and its bad part."""
    text, want = "+".join(parts), expected(parts)
    try:
        setup = parse_setup(text)
    except ValueError as err:
        message = str(err)
        assert want is None, f"{text!r} refused: {message}"
        assert f"configuration {text.strip()!r}" in message
        assert "part " in message or re.search("a (local window|blend) needs mapped layers", message), message
        event("refused by name")
        return
    assert want is not None, f"{text!r} parsed as {setup}"
    base = MappingConfig(establish_threshold=8, strategy="back")
    llm, slm = PAIRS["qwen2", torch.float32]
    try:
        (config,) = checked_configs(base, [setup])
        model = build(llm, slm, base, setup)
    except ValueError as err:  # what the pair or the window leaves no room for
        message = str(err)
        assert re.search(r"budget \d+ is smaller than .* local_window|mapping leaves none|maps none of", message), message
        event("refused for this pair")
        return
    assert (config.ratio, config.local_window, config.llm_cache) == (want["ratio"], want["local_window"], want["llm_cache"])
    assert config.blend == want["blend"] and (want["blend"] is None or model.resolved.config.blend == want["blend"])
    assert model.eviction == want["policy"]
    assert model.resolved.n_mapped == units_for_ratio(want["ratio"], 4)
    cache = forward(model, torch.arange(1, 31)[None]).cache
    assert (cache.mapping is not None) == (want["ratio"] > 0)
    kv = cache.kv_bytes()
    if want["ratio"] > 0 or want["llm_cache"] == "int8":
        assert kv["llm"] < kv["baseline"]
    elif want["policy"] is None:
        assert kv["llm"] == kv["baseline"]
    assert setup.plain == (want["ratio"] == 0 and want["policy"] is None and want["llm_cache"] == "native")
    event("ran as its label says")


# ---- the resumable retrieval's progress file ----------------------------------------------------------------------


def recorded(i: int) -> tuple[tuple, list[dict]]:
    """The ``i``-th measured sample as ``eval_retrieval`` records it: its key and answers."""
    answer = {"question": 0, "depth": 0.5, "correct": i % 2 == 0, "prediction": f"{i}", "expected": [f"{i}"]}
    answer |= {"llm_kv_dropped": 0.25, "total_kv": 0.8, "seconds": 0.1, "context_tokens": 600}
    answer |= {"total_kv_dropped_at_72b": 0.7, "scoring_seconds": 0.0}
    return ("iam0.5+w8", "passkey", 600, i), [answer]


corruptions = st.lists(
    st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1)),  # an interrupt: the file cut at any byte
        st.tuples(st.just("garbage"), st.integers(0, 11), st.binary(max_size=40).filter(lambda b: b"\n" not in b)),
        st.tuples(
            st.just("other shape"),
            st.integers(0, 11),
            st.sampled_from(
                [
                    "[1, 2]",
                    '{"key": "x"}',
                    "7",
                    "null",
                    '{"key": ["a", "b", 1, 2], "answers": [{"correct": "yes"}]}',
                    '{"key": ["a", "b", 1.5, 2], "answers": []}',
                ]
            ),
        ),
    ),
    max_size=4,
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(samples=st.integers(1, 12), damage=corruptions)
def test_a_damaged_progress_file_loses_no_valid_answer(tmp_path_factory, samples, damage):
    """Whatever an interrupt or a corruption left in the file, every whole recorded line is read back, every other
    line is skipped with a warning naming the file, and the file takes new answers on its own lines."""
    folder = tmp_path_factory.mktemp("out")
    path = retrieval.progress_file(folder, {"seed": 0})
    record = retrieval.recorder(path)
    for i in range(samples):
        record(*recorded(i))
    lines = path.read_bytes().split(b"\n")[:-1]
    for kind, *how in damage:
        if kind == "truncate":
            data = b"\n".join(lines) + b"\n"
            cut = data[: int(how[0] * len(data))]
            lines = cut.split(b"\n")  # the last piece is cut short (or empty)
        elif lines:
            lines[how[0] % len(lines)] = how[1] if kind == "garbage" else how[1].encode()
    path.write_bytes(b"\n".join(lines))
    path = retrieval.progress_file(folder, {"seed": 0})  # resuming: a line cut short is ended first
    whole = {key: answers for key, answers in map(recorded, range(samples)) if json_line(key, answers) in lines}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = retrieval.read_progress(path)
        assert {k: v for k, v in done.items() if k in whole} == whole
        assert all(str(path) in str(w.message) for w in caught)
        record(*recorded(99))
        assert retrieval.read_progress(path)[recorded(99)[0]] == recorded(99)[1]


def json_line(key: tuple, answers: list[dict]) -> bytes:
    return json.dumps({"key": list(key), "answers": answers}).encode()
