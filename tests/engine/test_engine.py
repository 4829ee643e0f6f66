"""The engine tier (``make test-vllm``): the vLLM plugin on tiny random Qwen2 and Llama pairs, against
``IAMForCausalLM``.

It runs in the engine's environment (``.venv-vllm``: vLLM pins transformers below 5.20) and is skipped where vLLM is
not installed, as in ``make test``. The transformers side runs in the project's environment (``IAM_PYTHON``, default
``.venv/bin/python``), in a subprocess that answers in JSON; each engine runs in its own process (``iam_vllm.run``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from iam_vllm.run import logged_capacity  # noqa: E402

ROOT = Path(__file__).parents[2]
IAM_PYTHON = os.environ.get("IAM_PYTHON", str(ROOT / ".venv/bin/python"))
REFERENCE = Path(__file__).with_name("reference.py")
KV_SPACE_GIB = 1
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    "VLLM_CPU_KVCACHE_SPACE": str(KV_SPACE_GIB),
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),  # this checkout's iam
}


def run(*argv: str) -> tuple[dict | None, str]:
    """The JSON line the command printed last, and all it printed (the engine's log included)."""
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), done.stdout + done.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Callable[[str], Path]:
    """The tiny pair of a family (head size 64), exported by ``iam export-vllm`` at ratio 0.5, once per module."""
    folders: dict[str, Path] = {}

    def of(family: str) -> Path:
        if family not in folders:
            folders[family] = tmp_path_factory.mktemp(family)
            run(IAM_PYTHON, str(REFERENCE), "pair", str(folders[family]), family)
        return folders[family]

    return of


def engine(model: Path, prompts: list[list[int]], new_tokens: int) -> tuple[dict, int]:
    """``iam_vllm.run``'s JSON and the KV capacity (tokens) the engine logged."""
    result, log = run(
        sys.executable,
        "-m",
        "iam_vllm.run",
        str(model),
        "--prompts",
        json.dumps(prompts),
        "--new-tokens",
        str(new_tokens),
        "--repeats",
        "0",
        "--max-model-len",
        "256",
    )
    capacity = logged_capacity(log)
    assert capacity is not None, log[-3000:]
    return result, capacity


def bytes_per_token(config: dict, mapped: set[int], slm: dict | None, slm_depth: int) -> int:
    """KV bytes per token (fp32): K and V of unmapped layers, V of mapped ones, K and V of the SLM's run layers."""
    per_layer = lambda c: c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"] * 4
    own = sum(per_layer(config) * (1 if i in mapped else 2) for i in range(config["num_hidden_layers"]))
    return own + (2 * per_layer(slm) * slm_depth if slm else 0)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_engine_tokens_equal_transformers_and_mapped_layers_hold_v_only(exported, family):
    folder = exported(family)
    reference, _ = run(IAM_PYTHON, str(REFERENCE), "generate", str(folder / "iam"))
    result, capacity = engine(folder / "iam", reference["prompts"], 16)
    assert result["tokens"] == reference["tokens"]  # fp32, batch 4, mixed lengths, 16 new tokens
    # the engine's own capacity figure: mapped layers hold V only, the SLM's run layers K and V
    config = json.loads((folder / "iam" / "config.json").read_text())
    iam = config["iam"]
    depth = 1 + max(
        s
        for layer in json.loads((folder / "iam" / "head_mapping.json").read_text())["layers"]
        for ((s, _, _),) in layer["borrow"]
    )
    per_token = bytes_per_token(config, set(iam["mapped_layers"]), iam["slm"], depth)
    assert capacity == KV_SPACE_GIB * 2**30 // per_token
    _, alone = engine(folder / "llm", reference["prompts"], 1)
    assert alone == KV_SPACE_GIB * 2**30 // bytes_per_token(config, set(), None, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_alias(folder: Path) -> dict[str, str]:
    """The environment under which the ``vllm`` command runs here. vllm-cpu 0.32.0's command looks up the version of a
    distribution named ``vllm`` and exits without one (``PackageNotFoundError``): where only ``vllm-cpu`` is installed,
    a metadata folder under that name, with the ``+cpu`` suffix vLLM's platform detection reads, goes on ``PYTHONPATH``
    (docs/serving.md). Where a distribution named ``vllm`` is installed (GPU builds), nothing is added."""
    try:
        version("vllm")
        return ENV
    except PackageNotFoundError:
        cpu = version("vllm-cpu").removesuffix("+cpu") + "+cpu"
        info = folder / f"vllm-{cpu}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu}\n")
        return {**ENV, "PYTHONPATH": os.pathsep.join([str(folder), ENV["PYTHONPATH"]])}


def test_openai_server_answers_a_chat_request_through_the_plugin(exported, tmp_path):
    folder, port = exported("qwen2"), free_port()
    argv = [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        str(folder / "iam"),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--served-model-name",
        "iam-tiny",
    ]
    env = vllm_alias(tmp_path / "alias")
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not start in 300 s"
                time.sleep(1)
        body = {"model": "iam-tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["model"] == "iam-tiny"
        assert answer["usage"]["completion_tokens"] > 0 and answer["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        server.wait(timeout=60)
