"""Projection to paper scale from measured parts: one decoder layer of the target at its real dimensions
(random weights), timed unmapped (SDPA and eager) and mapped in the same rounds, plus the whole SLM, the SLM
attention rows a decode step shares across mapped layers, and the LM head, then composed into full-model TTFT and
TPOT. Every measured part is reported beside the projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import DynamicCache

from ..core.attention import MappedAttention
from ..core.cache import IAMCache, KVLayer
from ..core.decoder import layer_forward
from ..core.kernels import Kernels
from ..core.mapping import HeadMap, Mapping, Window
from ..core.selection import units_for_ratio
from ..core.step import SLMStep
from ..eval.costs import decode_bytes, kv_bytes_per_token, layer_prefill_flops, prefill_flops
from ..models.presets import Arch, hf_config
from ..reporting import with_baseline
from .timing import timed

Mapped = tuple[MappedAttention, Mapping, SLMStep]
"""A mapped layer's attention for one run: the attention, its mapping and the SLM step it reads."""


class LayerBench:
    """One decoder layer of ``arch`` with random weights, and what it needs to run at ``tokens`` of context,
    unmapped and wholly mapped (the mapping already established) on ``kernels``, with an exact local window of
    ``local`` ``(sinks, window)`` if given."""

    def __init__(
        self,
        arch: Arch,
        slm: Arch,
        tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        local: tuple[int, int] | None = None,
        kernels: Kernels = Kernels(),
    ) -> None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

        layer_cls, rope_cls = {
            "qwen2": (Qwen2DecoderLayer, Qwen2RotaryEmbedding),
            "llama": (LlamaDecoderLayer, LlamaRotaryEmbedding),
        }[arch.family]
        self.config = hf_config(arch, layers=1, attn_implementation="sdpa")
        self.layer = layer_cls(self.config, 0).to(device=device, dtype=dtype).eval()
        self.attn = self.layer.self_attn
        self.rope = rope_cls(self.config).to(device)
        self.arch, self.slm, self.tokens, self.device, self.dtype, self.local = arch, slm, tokens, device, dtype, local
        self.kernels = kernels
        self.every = tuple(range(arch.kv_heads))
        g = torch.Generator(device="cpu").manual_seed(0)
        self.hidden = torch.randn(1, tokens + 1, arch.hidden, generator=g).to(device, dtype)

    def _run(self, mapped: Mapped | None, cache, start: int, length: int) -> None:
        """Tokens ``start .. start + length`` through the layer, unmapped or with the ``mapped`` attention."""
        pos = torch.arange(start, start + length, device=self.device)[None]
        hidden, rope = self.hidden[:, start : start + length], self.rope(self.hidden, pos)
        if mapped is None:
            self.layer(hidden, attention_mask=None, position_embeddings=rope, cache=cache, use_cache=True)
        else:
            attention, mapping, step = mapped
            layer_forward(self.layer, hidden, lambda x: attention(x, rope, None, cache, mapping, step))

    def _mapped(self, keys: int, queries: int) -> Mapped:
        """The layer's attention wholly mapped, over random SLM queries/keys of the SLM's dimensions and a random
        head map."""
        s, a = self.slm, self.arch
        g = torch.Generator(device="cpu").manual_seed(1)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(self.device, self.dtype)  # noqa: E731
        used = sorted(set(torch.randint(0, s.layers, (a.heads,), generator=g).tolist()))
        layer_of_head = torch.tensor(used)[torch.randint(0, len(used), (1, a.heads), generator=g)]
        cache_layers = []
        for _ in range(s.layers):
            cl = KVLayer()
            cl.update(rand(1, s.kv_heads, keys, s.head_dim), rand(1, s.kv_heads, 1, s.head_dim))
            cache_layers.append(cl)
        step = SLMStep(
            {i: rand(1, s.heads, queries, s.head_dim) for i in range(s.layers)},
            cache_layers,
            s.heads // s.kv_heads,
            s.head_dim**-0.5,
        )
        window = Window(torch.zeros(1, dtype=torch.long), torch.tensor([min(self.tokens, 100)]))
        mapping = Mapping({0: self.every}, window, a.heads, a.kv_heads, "cosine", 1)
        one = torch.ones(1, a.heads, 1, device=self.device)  # one SLM head per LLM head (blend 1), weight 1
        mapping.layers[0] = HeadMap(
            torch.arange(a.heads),
            layer_of_head[..., None].to(self.device),
            torch.randint(0, s.heads, (1, a.heads, 1), generator=g).to(self.device),
            one,
            one[..., 0],
        )
        return self._attention(self.kernels), mapping, step

    def _attention(self, kernels: Kernels) -> MappedAttention:
        """The layer's attention, wholly mapped, on ``kernels``."""
        return MappedAttention(self.attn, self.every, kernels, self.local)

    def _paired_cache(self) -> IAMCache:
        """An LLM cache with the layer wholly mapped (a ``ValueOnlyLayer``), and its ``LocalKeys`` with a window."""
        cache = IAMCache(self.config, self.config, local=self.local)
        cache.establish(
            Mapping(
                {0: self.every},
                Window(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)),
                self.arch.heads,
                self.arch.kv_heads,
                "cosine",
                1,
            )
        )
        return cache

    def prefill(self, attn: str = "sdpa") -> None:
        """Unmapped prefill of ``tokens`` on a fresh cache, with the ``attn`` attention implementation (the layer
        reads it from its config on every call)."""
        self.config._attn_implementation = attn
        try:
            self._run(None, DynamicCache(), 0, self.tokens)
        finally:
            self.config._attn_implementation = "sdpa"

    def prefill_steps(self, eager: bool) -> list[Callable[[], None]]:
        """Prefill of ``tokens`` on a fresh cache: unmapped, mapped, with a local window also mapped on the chunked
        reference kernel instead of the window's kernel (FlexAttention, or fused SDPA on a CPU), and, with
        ``eager``, unmapped with eager attention."""
        mapped = self._mapped(self.tokens, self.tokens)
        run = lambda m: self._run(m, self._paired_cache(), 0, self.tokens)  # noqa: E731
        steps = [self.prefill, lambda: run(mapped)]
        if self.local:
            reference = (self._attention(replace(self.kernels, flex_from=None, window_reference=True)), *mapped[1:])
            steps.append(lambda: run(reference))
        return steps + [lambda: self.prefill("eager")] if eager else steps

    def decode_steps(self) -> tuple[list[Callable[[], None]], Callable[[], None]]:
        """One decode step after ``tokens``, unmapped and mapped, each dropping what it appended to its cache; and
        the step's SLM attention rows of every SLM layer. A full model computes those rows once per step and shares
        them across all mapped layers, so they are timed apart rather than charged to the layer."""
        plain, paired = DynamicCache(), self._paired_cache()
        self._run(None, plain, 0, self.tokens)
        self._run(self._mapped(self.tokens, self.tokens), paired, 0, self.tokens)
        mapped = self._mapped(self.tokens + 1, 1)
        step = mapped[2]

        def unmapped_step() -> None:
            self._run(None, plain, self.tokens, 1)
            plain.crop(-1)

        def mapped_step() -> None:
            window_keys = paired.local.layers[0].keys if paired.local else None
            self._run(mapped, paired, self.tokens, 1)
            paired.layers[0].values = paired.layers[0].values[..., :-1, :]
            if window_keys is not None:  # the window slid by one: put it back
                paired.local.layers[0].keys = window_keys

        def slm_rows(step: SLMStep = step) -> None:
            for layer in range(self.slm.layers):
                step.decode_rows(layer, None)

        slm_rows()  # the step's rows exist before any layer reads them, as in a full model
        return [unmapped_step, mapped_step], lambda: slm_rows(
            SLMStep(step.queries, step.cache_layers, step.kv_groups, step.scaling)
        )


def slm_times(
    slm: Arch, tokens: int, device: torch.device, dtype: torch.dtype, repeats: int, decode_repeats: int
) -> tuple[float, float]:
    """Whole SLM (base model, no LM head) at real dimensions: prefill of ``tokens`` and one decode step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(slm)).to(device=device, dtype=dtype).eval().model
    ids = torch.randint(0, slm.vocab, (1, tokens + 1), device=device)
    (prefill,) = timed([lambda: model(input_ids=ids[:, :tokens], cache=DynamicCache())], repeats, device)
    cache = DynamicCache()
    model(input_ids=ids[:, :tokens], cache=cache, use_cache=True)

    def step() -> None:
        model(input_ids=ids[:, tokens:], cache=cache, use_cache=True)
        cache.crop(-1)

    return prefill, timed([step], decode_repeats, device)[0]


def head_time(arch: Arch, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    head = torch.nn.Linear(arch.hidden, arch.vocab, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(1, 1, arch.hidden, device=device, dtype=dtype)
    return timed([lambda: head(x)], repeats, device)[0]


def eager_budget(device: torch.device) -> int:
    """Bytes an eager layer's probabilities may take: half the free GPU memory, or 4 GiB on CPU."""
    return torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 4 << 30


@torch.inference_mode()
def project(
    llm: Arch,
    slm: Arch,
    ratios: list[float],
    tokens_list: list[int],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    decode_repeats: int,
    local: tuple[int, int] | None = None,
    kernels: Kernels = Kernels(),
) -> dict:
    """Measured parts and the projected full-model TTFT/TPOT per context length and ratio; with ``local``
    ``(sinks, window)`` the mapped layers attend exactly to an exact local window (``MappingConfig.local_window``).
    The mapped layer runs on ``kernels``, which every part and row reports.

    Prefills are timed over ``repeats`` rounds and decode steps, which are short and noisy, over ``decode_repeats``;
    the unmapped and mapped layer take turns within each round."""
    head = head_time(llm, device, dtype, decode_repeats)
    extent = sum(local) if local else 0  # tokens a window's query attends to exactly
    parts, rows = [], []
    for tokens in tokens_list:
        bench = LayerBench(llm, slm, tokens, device, dtype, local, kernels)
        eager = llm.heads * tokens**2 * dtype.itemsize <= eager_budget(device)  # eager holds heads x T x T probabilities
        layer_prefill, mapped_prefill, *others = timed(bench.prefill_steps(eager), repeats, device)
        reference_prefill, eager_prefill = (others.pop(0) if local else None), others
        decode_steps, rows_step = bench.decode_steps()
        layer_decode, mapped_decode = timed(decode_steps, decode_repeats, device)
        (slm_rows,) = timed([rows_step], decode_repeats, device)
        del bench, decode_steps, rows_step
        slm_prefill, slm_decode = slm_times(slm, tokens, device, dtype, repeats, decode_repeats)
        parts.append(
            {
                "tokens": tokens,
                "kernels": kernels.summary(),
                "layer_prefill_s": layer_prefill,
                "mapped_layer_prefill_s": mapped_prefill,
                "reference_kernel_prefill_s": reference_prefill,
                "window_kernel_over_reference": mapped_prefill / reference_prefill if local else None,
                "eager_layer_prefill_s": eager_prefill[0] if eager else None,
                "layer_decode_s": layer_decode,
                "mapped_layer_decode_s": mapped_decode,
                "slm_prefill_s": slm_prefill,
                "slm_decode_s": slm_decode,
                "slm_rows_decode_s": slm_rows,
                "lm_head_decode_s": head,
                "mapped_over_unmapped_prefill": mapped_prefill / layer_prefill,
                "mapped_over_unmapped_prefill_arithmetic": layer_prefill_flops(llm, slm, tokens, True, extent)
                / layer_prefill_flops(llm, slm, tokens),
            }
        )
        base_kv = kv_bytes_per_token(llm, slm, 0, 2)
        for r in with_baseline(ratios):
            n = units_for_ratio(r, llm.layers)
            extra = (slm_prefill, slm_decode + slm_rows) if n else (0.0, 0.0)
            ttft = (llm.layers - n) * layer_prefill + n * mapped_prefill + extra[0] + head
            tpot = (llm.layers - n) * layer_decode + n * mapped_decode + extra[1] + head
            rows.append(
                {
                    "tokens": tokens,
                    "ratio": r,
                    "kernels": kernels.summary(),
                    "kv_bytes": kv_bytes_per_token(llm, slm, n, 2, "int8"),
                    "kv_ratio": kv_bytes_per_token(llm, slm, n, 2, "int8") / base_kv,
                    "ttft_s": ttft,
                    "tpot_s": tpot,
                    "ttft_eager_s": llm.layers * eager_prefill[0] + head if n == 0 and eager else None,
                }
            )
        base = [row for row in rows if row["tokens"] == tokens and row["ratio"] == 0][0]
        for row in rows:
            if row["tokens"] != tokens:
                continue
            n = units_for_ratio(row["ratio"], llm.layers)
            row["ttft_speedup"] = base["ttft_s"] / row["ttft_s"]
            row["tpot_speedup"] = base["tpot_s"] / row["tpot_s"]
            row["ttft_speedup_vs_eager"] = base["ttft_eager_s"] / row["ttft_s"] if base["ttft_eager_s"] else None
            row["ttft_limit"] = prefill_flops(llm, slm, 0, tokens) / prefill_flops(llm, slm, n, tokens, extent)
            step = decode_bytes(llm, slm, n, 1, tokens, 2, "int8", extent)
            row["tpot_limit"] = decode_bytes(llm, slm, 0, 1, tokens, 2) / step
            row["ttft_of_limit"] = row["ttft_speedup"] / row["ttft_limit"]
    return {"parts": parts, "rows": rows}
