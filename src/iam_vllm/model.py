"""``IAMQwen2ForCausalLM``, ``IAMLlamaForCausalLM``: an LLM and its SLM of one family in one vLLM model, built from
vLLM's own layers (what differs between the families is the table ``FAMILIES``).

The engine schedules one model. Each forward runs the SLM's first ``depth`` layers (as deep as the fixed head mapping
borrows), recording their post-RoPE queries, then the LLM. An unmapped LLM layer is vLLM's own decoder layer of the
family with vLLM's attention. A mapped layer projects V only (its Q/K weights are not even loaded), caches V only
(``iam_vllm.paged.ValueOnlyAttentionSpec``), and attends with each head's borrowed SLM query over the borrowed SLM
head's cached keys, applied to its own V at the SLM's scale: ``softmax(q_slm k_slm^T) V_llm``, what ``IAMForCausalLM``
computes with the same mapping. The SLM's and the mapped layers' caches are ``iam_vllm.paged.PagedCache``s, read
across layers in torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader, safetensors_weights_iterator
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaMLP
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2MLP
from vllm.transformers_utils.config import set_default_rope_theta

from iam.core.fixed import FixedMapping, read_head_mapping

from . import check_served
from .paged import Batch, PagedCache, attend

STACKED = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)
"""vLLM's fused projections and the checkpoint tensors loaded into their shards."""


@dataclass(frozen=True)
class Family:
    """What differs between the served families: vLLM's own decoder layer (for unmapped LLM layers) and MLP, whether
    the attention's QKV and output projections carry a bias, and RoPE's base where a config names none."""

    layer: Callable[[VllmConfig, PretrainedConfig, str], nn.Module]
    mlp: Callable[[PretrainedConfig, QuantizationConfig | None, str], nn.Module]
    qkv_bias: Callable[[PretrainedConfig], bool]
    o_bias: Callable[[PretrainedConfig], bool]
    rope_theta: float


FAMILIES = {
    "qwen2": Family(
        layer=lambda vllm, c, prefix: Qwen2DecoderLayer(c, vllm.cache_config, vllm.quant_config, prefix),
        mlp=lambda c, quant, prefix: Qwen2MLP(c.hidden_size, c.intermediate_size, c.hidden_act, quant, prefix),
        qkv_bias=lambda c: True,
        o_bias=lambda c: False,
        rope_theta=1000000,
    ),
    "llama": Family(
        layer=lambda vllm, c, prefix: LlamaDecoderLayer(vllm, prefix, config=c),
        mlp=lambda c, quant, prefix: LlamaMLP(
            c.hidden_size, c.intermediate_size, c.hidden_act, quant, bias=getattr(c, "mlp_bias", False), prefix=prefix
        ),
        qkv_bias=lambda c: getattr(c, "attention_bias", False),
        o_bias=lambda c: getattr(c, "attention_bias", False),
        rope_theta=10000,
    ),
}
"""The families served, by ``model_type`` (``iam_vllm.ARCHITECTURES`` names their model classes)."""


def head_size(config: PretrainedConfig) -> int:
    """The config's head size: its ``head_dim`` where it names one, else hidden size over heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def pair_of(config: PretrainedConfig, folder: Path, family: str) -> tuple[PretrainedConfig, FixedMapping, Path]:
    """The SLM's config, the fixed mapping and the SLM's weights folder of an exported IAM folder's ``config``, a
    ``family`` pair; ``ValueError`` naming what is missing or unserved."""
    iam = getattr(config, "iam", None)
    if not isinstance(iam, dict) or not {"slm", "slm_folder", "head_mapping"} <= iam.keys():
        raise ValueError(f"{folder / 'config.json'} has no complete 'iam' block: write the folder with `iam export-vllm`.")
    slm = AutoConfig.for_model(**iam["slm"])
    if (config.model_type, slm.model_type) != (family, family):
        raise ValueError(
            f"{folder / 'config.json'} pairs a {config.model_type!r} LLM with a {slm.model_type!r} SLM, but names the "
            f"{family!r} model class: write the folder again with `iam export-vllm`."
        )
    fixed = read_head_mapping(folder / iam["head_mapping"], config, slm)
    check_served(fixed.plan, fixed.blend, config.num_key_value_heads)
    slm_folder = Path(iam["slm_folder"])
    if not sorted(slm_folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: the SLM's weights folder {slm_folder} holds no .safetensors files.")
    return slm, fixed, slm_folder


class Step:
    """The SLM's part of one forward, read by the mapped layers: every SLM layer's post-RoPE queries of the new tokens
    ``[B, L * H_s, Q, d_s]`` and its keys ``[B, L * H_kv_s, N, d_s]``, padded as ``paged.Batch`` pads them; and the
    forward's batches (``batches``, built once for all its layers)."""

    def __init__(self) -> None:
        self.batches: dict[tuple[int, int], Batch] = {}
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.queries: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def add(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self.parts.append((q, k))

    def close(self) -> None:
        if self.parts:  # none in a profiling run
            self.queries, self.keys = (torch.cat(part, 1) for part in zip(*self.parts))
        self.parts = []


class SLMAttention(nn.Module):
    """An SLM layer's attention, vLLM's projections and rotary embedding over a ``PagedCache`` (K and V), recording
    its post-RoPE queries and the keys it read (the batch's, padded) in the forward's ``Step``."""

    def __init__(self, config: PretrainedConfig, family: Family, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        self.heads, self.kv, self.d = heads, kv, head_size(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.d, heads, kv, family.qkv_bias(config), quant_config=quant_config, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(
            heads * self.d, config.hidden_size, family.o_bias(config), quant_config=quant_config, prefix=f"{prefix}.o_proj"
        )
        self.rotary_emb = get_rope(self.d, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters)
        self.attn = PagedCache(heads, kv, self.d, value_only=False, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, step: Step) -> torch.Tensor:
        t = hidden_states.shape[0]
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.heads * self.d, self.kv * self.d, self.kv * self.d], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        batch = self.attn.batch(step.batches)
        if batch is None:  # a profiling run
            return self.o_proj(torch.zeros_like(q))[0]
        self.attn.store(batch, torch.cat([k.view(t, self.kv, self.d), v.view(t, self.kv, self.d)], -1))
        kv = self.attn.read(batch)
        q, keys = batch.pad(q.view(t, self.heads, self.d)), kv[..., : self.d]
        step.add(q, keys)
        out = batch.unpad(attend(q, keys, kv[..., self.d :], batch.mask, self.d**-0.5), t)
        return self.o_proj(out.reshape(t, -1))[0]


class MappedAttention(nn.Module):
    """A mapped layer's attention: V projected into a V-only ``PagedCache``, each head's query and keys borrowed from
    its SLM ``(layer, head)`` (``borrow``), attended at the SLM's scale, then ``o_proj``. No Q/K rows, no K cached."""

    def __init__(
        self,
        config: PretrainedConfig,
        slm: PretrainedConfig,
        family: Family,
        borrow: list[tuple[int, int]],
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        self.heads, self.kv, self.d = heads, kv, head_size(config)
        self.scale = head_size(slm) ** -0.5
        self.v_proj = ColumnParallelLinear(
            config.hidden_size, kv * self.d, bias=family.qkv_bias(config), quant_config=quant_config, prefix=f"{prefix}.v_proj"
        )
        self.o_proj = RowParallelLinear(
            heads * self.d, config.hidden_size, bias=family.o_bias(config), quant_config=quant_config, prefix=f"{prefix}.o_proj"
        )
        slm_groups = slm.num_attention_heads // slm.num_key_value_heads
        for name, index in (
            ("q_index", [layer * slm.num_attention_heads + head for layer, head in borrow]),
            ("k_index", [layer * slm.num_key_value_heads + head // slm_groups for layer, head in borrow]),
            ("v_index", [h // (heads // kv) for h in range(heads)]),
        ):
            self.register_buffer(name, torch.tensor(index), persistent=False)
        self.attn = PagedCache(heads, kv, self.d, value_only=True, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, step: Step) -> torch.Tensor:
        t = hidden_states.shape[0]
        v, _ = self.v_proj(hidden_states)
        batch = self.attn.batch(step.batches)
        if batch is None:  # a profiling run
            return self.o_proj(v.new_zeros(t, self.heads * self.d))[0]
        self.attn.store(batch, v.view(t, self.kv, self.d))
        values = self.attn.read(batch)[:, self.v_index]
        out = attend(step.queries[:, self.q_index], step.keys[:, self.k_index], values, batch.mask, self.scale)
        return self.o_proj(batch.unpad(out, t).reshape(t, -1))[0]


class DecoderLayer(nn.Module):
    """A decoder layer of the family around one of IAM's attentions; its MLP and norms are vLLM's."""

    def __init__(
        self, config: PretrainedConfig, family: Family, self_attn: nn.Module, quant_config: QuantizationConfig | None, prefix: str
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = family.mlp(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, step: Step):
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, step)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Stack(nn.Module):
    """A model's embedding, decoder layers and (for the LLM) final norm, named as in its checkpoint."""

    def __init__(self, config, layers: list[nn.Module], prefix: str, norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if norm else None


class IAMCausalLM(nn.Module):
    """An LLM whose mapped layers borrow attention from an SLM of its ``family`` through a fixed head mapping (the
    folder that ``iam export-vllm`` writes). Tensor parallelism is not served yet."""

    family: ClassVar[str]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config, name = vllm_config.model_config.hf_config, type(self).__name__
        if get_tensor_model_parallel_world_size() > 1:
            raise ValueError(f"{name} does not serve tensor parallelism yet: run with tensor_parallel_size=1.")
        slm, fixed, self.slm_folder = pair_of(config, Path(vllm_config.model_config.model), self.family)
        family, quant = FAMILIES[self.family], vllm_config.quant_config
        self.config, self.slm_config, self.depth = config, slm, fixed.slm_depth
        borrow = {layer: [(s, h) for ((s, h, _),) in heads] for layer, heads in fixed.borrow.items()}
        mapped = lambda i: MappedAttention(config, slm, family, borrow[i], quant, f"model.layers.{i}.self_attn")
        layers = [
            DecoderLayer(config, family, mapped(i), quant, f"model.layers.{i}")
            if i in borrow
            else family.layer(vllm_config, config, f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        ]
        self.model = Stack(config, layers, "model", norm=True)
        set_default_rope_theta(slm, default_theta=family.rope_theta)
        slm_attention = lambda j: SLMAttention(slm, family, quant, f"slm.layers.{j}.self_attn")
        self.slm = Stack(
            slm,
            [DecoderLayer(slm, family, slm_attention(j), quant, f"slm.layers.{j}") for j in range(self.depth)],
            "slm",
            norm=False,
        )
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None):
        if inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__} takes token ids: the SLM reads the same tokens.")
        step = Step()
        hidden, residual = self.slm.embed_tokens(input_ids), None
        for layer in self.slm.layers:
            hidden, residual = layer(positions, hidden, residual, step)
        step.close()
        hidden, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            if isinstance(layer, DecoderLayer):
                hidden, residual = layer(positions, hidden, residual, step)
            else:
                hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The LLM's tensors from the folder (``weights``, through vLLM's loader), then the SLM's first ``depth`` layers
        and embedding from its own folder, each into vLLM's fused projections; a mapped layer's Q/K are skipped."""
        slm_files = [str(p) for p in sorted(self.slm_folder.glob("*.safetensors"))]
        slm = (
            (f"slm.{name.removeprefix('model.')}", w)
            for name, w in safetensors_weights_iterator(slm_files, False)
            if name.startswith("model.")  # the SLM's LM head never runs
        )
        params, loaded = dict(self.named_parameters()), set()
        for name, weight in (*weights, *slm):
            if self._skipped(name):
                continue
            for fused, part, shard in STACKED:
                target = name.replace(part, fused)
                if part in name and target in params:
                    params[target].weight_loader(params[target], weight, shard)
                    loaded.add(target)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
                loaded.add(name)
        return loaded

    def _skipped(self, name: str) -> bool:
        """Checkpoint tensors this model does not hold: a mapped layer's Q/K, the SLM's deeper layers, norm and head,
        a tied LM head, rotary caches."""
        parts = name.split(".")
        if "rotary_emb.inv_freq" in name or (name.startswith("lm_head") and self.config.tie_word_embeddings):
            return True
        if parts[0] == "slm":
            return parts[1] == "norm" or (parts[1] == "layers" and int(parts[2]) >= self.depth)
        if parts[:2] == ["model", "layers"] and isinstance(self.model.layers[int(parts[2])].self_attn, MappedAttention):
            return parts[4] in ("q_proj", "k_proj")
        return False


class IAMQwen2ForCausalLM(IAMCausalLM):
    """A Qwen2 / Qwen2.5 pair."""

    family = "qwen2"


class IAMLlamaForCausalLM(IAMCausalLM):
    """A Llama pair (Llama 2 and 3, SmolLM2 and the other checkpoints of ``model_type`` llama)."""

    family = "llama"
