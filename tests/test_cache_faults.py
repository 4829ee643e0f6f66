"""Fault injection on the model cache, through the real loader on tiny Qwen2 GGUF files written in code: builds
killed by SIGKILL and SIGTERM at random points, concurrent builders beside a reader, and damaged cached files.

Child processes come from a fork server that imports the loader once, so each starts in milliseconds."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import tiny
from iam.models import loading, store

# a byte-level BPE vocabulary of 97 tokens (the tiny models' size): end of text, the spellings of space, newline and
# printable ASCII but "~", and one merge
TOKENS = ["<|endoftext|>", "\u0120", "\u010a", *(chr(b) for b in range(33, 126)), "ab"]
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(name: str) -> str:
    """llama.cpp's name for a transformers Qwen2 parameter."""
    module, kind = name.rsplit(".", 1)
    if module in TOP_TENSORS:
        return f"{TOP_TENSORS[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{LAYER_TENSORS[rest]}.{kind}"


def write_gguf(path: Path, seed: int) -> torch.nn.Module:
    """Write the tiny Qwen2 SLM of ``conftest`` (random weights from ``seed``) as an fp32 GGUF file; return it."""
    model = tiny("qwen2", 2, 32, 2, 1, seed=seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(TOKENS) - 1))
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(gguf_name(name), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """One digest of a model's weights and its tokenizer's vocabulary."""
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, str]:
    """A tiny GGUF file and the fingerprint of a correct load of it (weights as written, 97-token vocabulary)."""
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.gguf"
    written = write_gguf(path, seed=1)
    old = os.environ.get("IAM_CACHE")
    os.environ["IAM_CACHE"] = str(folder / "reference-cache")
    try:
        model, tokenizer = loading.load_model(path, progress=False)
    finally:
        os.environ.pop("IAM_CACHE") if old is None else os.environ.update(IAM_CACHE=old)
    assert all(torch.equal(t, written.state_dict()[n]) for n, t in model.state_dict().items())
    assert len(tokenizer) == len(TOKENS)
    return path, fingerprint(model, tokenizer)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entry(cache: Path) -> Path:
    """The one cache entry built from a GGUF file."""
    (folder,) = cache.glob("gguf-*[!k]")  # not the .lock
    return folder


def leftovers(cache: Path) -> list[str]:
    """What the cache holds besides entries, their lock files and the sources' digests."""
    entries = {p.name for p in cache.glob("gguf-*") if p.is_dir() and (p / store.MANIFEST).is_file()}
    allowed = entries | {f"{e}.lock" for e in entries} | {"sources"}
    stray = [p.name for p in cache.iterdir() if p.name not in allowed]
    return stray + [f"sources/{p.name}" for p in (cache / "sources").glob("*") if p.suffix != ".json"]


def load_fingerprint(path: Path) -> str:
    return fingerprint(*loading.load_model(path, progress=False))


# child processes ----------------------------------------------------------------------------------------------


def forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["iam.models.loading", "test_cache_faults"])
    return context


def child_build(cache: str, path: str) -> None:
    os.environ["IAM_CACHE"] = cache
    try:
        loading.resolve(path, progress=False)
    except KeyboardInterrupt:  # SIGTERM during the build, cleaned up
        sys.exit(130)


def child_read(cache: str, path: str, expected: str, stop, failures) -> None:
    """Load in a loop until ``stop`` is set (and at least a few times, for a minute at most), counting loads that fail
    or differ."""
    os.environ["IAM_CACHE"] = cache
    loads, deadline = 0, time.monotonic() + 60
    while (not stop.is_set() or loads < 3) and time.monotonic() < deadline:
        try:
            ok = load_fingerprint(Path(path)) == expected
        except Exception as err:  # any failure to load counts
            print(f"reader: {type(err).__name__}: {err}", file=sys.stderr)
            ok = False
        loads += 1
        if not ok:
            with failures.get_lock():
                failures.value += 1


def timed_build(context, cache: Path, path: Path) -> float:
    """Seconds a child takes to build the entry from scratch."""
    start = time.perf_counter()
    child = context.Process(target=child_build, args=(str(cache), str(path)), daemon=True)
    child.start()
    child.join(60)
    assert child.exitcode == 0
    return time.perf_counter() - start


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_build_killed_at_a_random_point_leaves_a_correct_cache_after_the_next_load(source, tmp_path, monkeypatch, sig):
    path, expected = source
    context = forkserver()
    span = min(timed_build(context, tmp_path / f"timing{i}", path) for i in range(2))  # the first starts the server
    rng = random.Random(16 + sig)
    interrupted = 0  # rounds killed in the middle of a build
    for round_ in range(32):  # 8 rounds, more where none was killed midway (a loaded machine shifts the timing)
        if round_ >= 8 and interrupted:
            break
        cache = tmp_path / f"cache{round_}"
        child = context.Process(target=child_build, args=(str(cache), str(path)), daemon=True)
        child.start()
        time.sleep(rng.uniform(0, span))
        child.kill() if sig == signal.SIGKILL else child.terminate()
        child.join(60)
        if sig == signal.SIGTERM:  # handled like Ctrl-C: the temporary data went with the process
            assert child.exitcode in (0, 130, -signal.SIGTERM) and not list(cache.glob("*.partial-*"))
            interrupted += child.exitcode == 130
        else:
            interrupted += bool(list(cache.glob("*.partial-*")))
        monkeypatch.setenv("IAM_CACHE", str(cache))
        assert load_fingerprint(path) == expected
        assert leftovers(cache) == []
    assert interrupted > 0


def test_concurrent_builders_never_show_a_reader_a_partial_or_wrong_folder(source, tmp_path):
    path, expected = source
    context = forkserver()
    for round_ in range(3):
        cache = str(tmp_path / f"cache{round_}")
        stop, failures = context.Event(), context.Value("i", 0)
        reader = context.Process(target=child_read, args=(cache, str(path), expected, stop, failures), daemon=True)
        builders = [context.Process(target=child_build, args=(cache, str(path)), daemon=True) for _ in range(3)]
        try:
            for child in [reader, *builders]:
                child.start()
            for child in builders:
                child.join(60)
        finally:
            stop.set()
            reader.join(90)
            for child in [reader, *builders]:
                child.kill()
        assert [child.exitcode for child in builders] == [0, 0, 0]
        assert reader.exitcode == 0 and failures.value == 0
        assert leftovers(Path(cache)) == []


# damaged files --------------------------------------------------------------------------------------------------


def flip(path: Path) -> None:
    """Invert one byte in the middle of ``path``, and set its mtime back as a careful vandal would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def damaged_files() -> list[tuple[str, str]]:
    names = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    return [*((name, "flip") for name in names), ("model.safetensors", "truncate"), ("tokenizer.json", "zero")]


@pytest.mark.parametrize("name, damage", damaged_files())
def test_a_damaged_cached_file_is_rebuilt_never_loaded(source, cache, name, damage):
    path, expected = source
    loading.resolve(path, progress=False)
    target = entry(cache) / name
    assert target.is_file()
    if damage == "flip":
        flip(target)
    elif damage == "truncate":
        os.truncate(target, target.stat().st_size - 100)
    else:
        target.write_bytes(b"")
    assert store.problem(entry(cache)) is not None
    assert load_fingerprint(path) == expected
    assert store.problem(entry(cache)) is None and leftovers(cache) == []


@pytest.mark.parametrize("damage", ["manifest deleted", "manifest corrupt", "file added", "file removed"])
def test_a_folder_that_does_not_match_its_manifest_is_rebuilt(source, cache, damage):
    path, expected = source
    folder = loading.resolve(path, progress=False)
    if damage == "manifest deleted":  # also what an unfinished build, or a cache from before manifests, looks like
        (folder / store.MANIFEST).unlink()
    elif damage == "manifest corrupt":
        (folder / store.MANIFEST).write_text('{"files": ')
    elif damage == "file added":
        (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    else:
        (folder / "tokenizer.json").unlink()
    assert load_fingerprint(path) == expected
    assert store.problem(folder) is None and not (folder / "pytorch_model.bin").exists()


def ship_as_tiny(path: Path, monkeypatch) -> None:
    """Serve the GGUF file ``path`` as the shipped model alias ``tiny``, one chunk package."""
    data = path.read_bytes()
    shipped = loading.ShippedModel("tiny-part{i}", "1.0", 1, len(data), hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(loading.ALIASES, "tiny", shipped)
    monkeypatch.setattr(loading, "chunk_files", lambda model: [path])


def test_a_damaged_entry_whose_source_is_gone_is_refused_naming_the_file(source, cache, monkeypatch):
    """A shipped model whose chunk packages are uninstalled cannot be rebuilt; loaded as a folder, no entry can."""
    path, _ = source
    ship_as_tiny(path, monkeypatch)
    folder = loading.resolve("tiny", progress=False)
    flip(folder / "model.safetensors")

    def uninstalled(model):
        raise FileNotFoundError("missing model chunk package tiny-part1==1.0")

    monkeypatch.setattr(loading, "chunk_files", uninstalled)
    corrupt = rf"{folder}/model.safetensors does not match its sha256.*it is not loaded"
    with pytest.raises(FileNotFoundError, match=rf"{corrupt}.*missing model chunk package.*Delete {folder}"):
        loading.load_model("tiny", progress=False)
    with pytest.raises(ValueError, match=rf"{corrupt}\. Delete {folder}"):
        loading.load_model(folder, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ["tiny", "tiny.lock"]  # kept for the user to delete


def test_a_verified_entry_loads_without_hashing_and_a_touched_one_is_hashed_once(source, cache, monkeypatch):
    path, expected = source
    folder = loading.resolve(path, progress=False)
    hashed = []
    real = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    assert load_fingerprint(path) == expected and hashed == []
    os.utime(folder / "tokenizer.json")  # same bytes, new stamp: hashed, found intact, restamped
    assert load_fingerprint(path) == expected and hashed == ["tokenizer.json"]
    assert load_fingerprint(path) == expected and hashed == ["tokenizer.json"]


def test_another_gguf_at_the_same_path_with_the_same_size_and_mtime_is_another_entry(source, cache, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, seed=1)
    first = load_fingerprint(path)
    st = path.stat()
    replacement = write_gguf(tmp_path / "other.gguf", seed=2)
    os.replace(tmp_path / "other.gguf", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    model, tokenizer = loading.load_model(path, progress=False)
    assert all(torch.equal(t, replacement.state_dict()[n]) for n, t in model.state_dict().items())
    assert fingerprint(model, tokenizer) != first and len(list(cache.glob("gguf-model-*.lock"))) == 2


def test_an_interrupted_shipped_model_build_leaves_no_assembled_gguf(source, cache, monkeypatch):
    path, _ = source
    ship_as_tiny(path, monkeypatch)
    assembled = []

    def interrupted(gguf_file, out):
        assembled.append(gguf_file.stat().st_size)
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loading.resolve("tiny", progress=False)
    assert assembled == [path.stat().st_size] and sorted(p.name for p in cache.iterdir()) == ["tiny.lock"]


def test_leftovers_of_dead_builds_are_swept_by_the_next_load(source, cache):
    path, expected = source
    folder = loading.resolve(path, progress=False)
    for stale in (f"{folder.name}.partial-abc123", f"{folder.name}.x1y2.partial"):  # ours, and an older version's
        (cache / stale / "out").mkdir(parents=True)
        (cache / stale / "out" / "model.safetensors").write_bytes(b"half")
    assert load_fingerprint(path) == expected and leftovers(cache) == []


def test_a_running_build_keeps_its_temporary_data(source, cache):
    path, _ = source
    folder = loading.resolve(path, progress=False)
    live = cache / f"{folder.name}.partial-live"
    live.mkdir()
    with store.build_lock(folder):
        loading.resolve(path, progress=False)
    assert live.is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_cache_respects_the_umask(source, cache, umask):
    path, _ = source
    previous = os.umask(umask)
    try:
        folder = loading.resolve(path, progress=False)
    finally:
        os.umask(previous)
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~umask}


def test_an_empty_iam_cache_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("IAM_CACHE", "")
    assert loading.cache_root() == tmp_path / ".cache" / "iam"
    monkeypatch.setenv("IAM_CACHE", str(tmp_path / "elsewhere"))
    assert loading.cache_root() == tmp_path / "elsewhere"


def test_recording_new_stamps_never_shows_a_concurrent_verifier_an_extra_file(source, cache, monkeypatch):
    path, expected = source
    folder = loading.resolve(path, progress=False)
    os.utime(folder / "tokenizer.json")  # hashed on the next load, then restamped
    listings = []
    real = os.replace

    def replace(src, dst):  # what another process verifying at this moment lists: the new manifest is not in place yet
        listings.append(sorted(p.name for p in folder.iterdir()))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert load_fingerprint(path) == expected
    assert listings == [sorted([*json.loads((folder / store.MANIFEST).read_text())["files"], store.MANIFEST])]


def write_one(out: Path) -> None:
    (out / "weights.bin").write_bytes(b"w" * 64)


def test_a_dangling_symlink_at_a_key_is_replaced_by_the_build(tmp_path):
    """It made every later load fail until someone deleted it."""
    dest = tmp_path / "key"
    dest.symlink_to(tmp_path / "gone")
    assert store.ensure(dest, "src", "origin", write_one, progress=False) == dest
    assert not dest.is_symlink() and (dest / "weights.bin").read_bytes() == b"w" * 64 and not store.temporaries(dest)


def test_a_full_disk_during_a_build_is_a_user_error_naming_the_cache(tmp_path):
    import errno

    def full(out: Path) -> None:
        (out / "part").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))

    dest = tmp_path / "key"
    with pytest.raises(ValueError, match=rf"building {dest} from origin failed: No space left on device .*IAM_CACHE"):
        store.ensure(dest, "src", "origin", full, progress=False)
    assert not dest.exists() and not store.temporaries(dest)


def test_an_iam_cache_that_is_a_file_is_a_user_error(tmp_path):
    root = tmp_path / "cache"
    root.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"the model cache {root} is not a writable folder .*set IAM_CACHE to one"):
        store.ensure(root / "key", "src", "origin", write_one, progress=False)
