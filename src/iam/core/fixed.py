"""A fixed head mapping: one map for every sequence, chosen offline and stored in a file.

The transformers path establishes a mapping per sequence on its first window. A serving engine batches many
sequences and schedules one model, so it serves one map, chosen over a calibration set (``choose``) and written
with the exported model (``iam export-vllm``). ``MappingConfig(head_mapping=path)`` runs ``IAMForCausalLM`` with
the same map, so that both paths can be compared token for token.

The file (JSON, ``FORMAT``) names the pair's architectures and, per mapped LLM layer, its mapped KV groups and, for
each of their query heads, the ``blend`` SLM heads it borrows with their weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from ..io import write_atomic
from .calibration import arch_key
from .mapping import HeadMap, Mapping
from .selection import Plan, format_plan

FORMAT = "iam-head-mapping/1"


@dataclass(frozen=True)
class FixedMapping:
    """One head map for every sequence.

    Parameters
    ----------
    llm, slm : the pair's architecture keys (``iam.core.calibration.arch_key``).
    plan : mapped KV groups per mapped LLM layer.
    borrow : per mapped layer, ``[H_m][blend]`` ``(slm_layer, slm_head, weight)`` of each mapped query head (the
        heads of the layer's mapped KV groups, in order).
    similarity : per mapped layer, ``[H_m]`` the similarity each head's borrowed attention had where it was chosen
        (NaN where unknown).
    metric : the similarity metric that chose it.
    source : how it was chosen (free-form, written into the file).
    """

    llm: str
    slm: str
    plan: Plan
    borrow: dict[int, list[list[tuple[int, int, float]]]]
    similarity: dict[int, list[float]]
    metric: str
    source: dict

    @property
    def blend(self) -> int:
        return len(next(iter(self.borrow.values()))[0])

    @property
    def slm_depth(self) -> int:
        """SLM layers run: as deep as the deepest one borrowed."""
        return 1 + max(s for heads in self.borrow.values() for mix in heads for s, _, _ in mix)

    def units(self, n_kv: int) -> list[int | str]:
        return format_plan(self.plan, n_kv)

    def mapping(self, batch: int, mapping: Mapping) -> Mapping:
        """``mapping`` (a fresh one of this plan) with every layer's ``HeadMap`` filled in for ``batch`` sequences."""
        heads_per_kv = mapping.n_heads // mapping.n_kv
        for layer, groups in self.plan.items():
            mix = torch.tensor(self.borrow[layer], dtype=torch.float64)  # [H_m, k, 3]
            expand = lambda x: x.expand(batch, *x.shape).contiguous()
            mapping.layers[layer] = HeadMap(
                heads=torch.tensor([g * heads_per_kv + j for g in groups for j in range(heads_per_kv)]),
                slm_layer=expand(mix[..., 0].long()),
                slm_head=expand(mix[..., 1].long()),
                weight=expand(mix[..., 2].float()),
                score=expand(torch.tensor(self.similarity[layer], dtype=torch.float32)),
            )
        return mapping

    @classmethod
    def of(cls, mapping: Mapping, llm: PretrainedConfig, slm: PretrainedConfig, row: int = 0, **source) -> FixedMapping:
        """The map one sequence (``row``) of ``mapping`` established."""
        borrow, similarity = {}, {}
        for layer, m in mapping.layers.items():
            triples = torch.stack([m.slm_layer[row].double(), m.slm_head[row].double(), m.weight[row].double()], -1)
            borrow[layer] = [[(int(a), int(b), float(w)) for a, b, w in head] for head in triples.tolist()]
            similarity[layer] = m.score[row].tolist()
        return cls(arch_key(llm), arch_key(slm), dict(mapping.plan), borrow, similarity, mapping.metric, source)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "llm": self.llm,
            "slm": self.slm,
            "metric": self.metric,
            "blend": self.blend,
            "source": self.source,
            "layers": [
                {
                    "layer": layer,
                    "kv_groups": list(groups),
                    "borrow": [[list(t) for t in mix] for mix in self.borrow[layer]],
                    "similarity": [None if math.isnan(s) else round(s, 6) for s in self.similarity[layer]],
                }
                for layer, groups in self.plan.items()
            ],
        }

    def save(self, path: str | Path) -> None:
        """Write the file atomically."""
        write_atomic(Path(path), json.dumps(self.to_json(), indent=1) + "\n")


def read_head_mapping(path: str | Path, llm: PretrainedConfig, slm: PretrainedConfig) -> FixedMapping:
    """The fixed mapping in ``path``, checked against the pair: ``ValueError`` naming the file where it is not a head
    mapping file, is for another pair, or names layers, KV groups or heads the models do not have."""

    def bad(why: str) -> ValueError:
        return ValueError(f"head mapping file {path}: {why}.")

    try:
        record = json.loads(Path(path).read_text())
        if record.get("format") != FORMAT:
            raise bad(f"not a head mapping (format {record.get('format')!r}, expected {FORMAT!r})")
        key_llm, key_slm, metric, layers = record["llm"], record["slm"], record["metric"], record["layers"]
        plan = {int(x["layer"]): tuple(int(g) for g in x["kv_groups"]) for x in layers}
        borrow = {int(x["layer"]): [[(int(s), int(h), float(w)) for s, h, w in mix] for mix in x["borrow"]] for x in layers}
        similarity = {int(x["layer"]): [math.nan if s is None else float(s) for s in x["similarity"]] for x in layers}
    except ValueError as err:
        raise bad(str(err)) if not str(err).startswith("head mapping file") else err from None
    except (OSError, KeyError, TypeError, AttributeError) as err:
        raise bad(f"unreadable or incomplete ({type(err).__name__}: {err})") from None
    if (key_llm, key_slm) != (arch_key(llm), arch_key(slm)):
        raise bad(f"it maps {key_llm} onto {key_slm}, not this pair ({arch_key(llm)} onto {arch_key(slm)})")
    per_kv = llm.num_attention_heads // llm.num_key_value_heads
    if not plan or len(plan) != len(layers):
        raise bad("it maps no layer, or a layer twice")
    blends = set()
    for layer, groups in plan.items():
        if not 0 <= layer < llm.num_hidden_layers:
            raise bad(f"layer {layer} is outside the LLM's {llm.num_hidden_layers} layers")
        if not groups or len(set(groups)) != len(groups) or not all(0 <= g < llm.num_key_value_heads for g in groups):
            raise bad(f"layer {layer}'s KV groups {list(groups)} are not distinct groups of 0..{llm.num_key_value_heads - 1}")
        heads = borrow[layer]
        if len(heads) != len(groups) * per_kv or len(similarity[layer]) != len(heads):
            raise bad(f"layer {layer} gives {len(heads)} heads for {len(groups)} KV groups of {per_kv} heads")
        for mix in heads:
            blends.add(len(mix))
            if any(not (0 <= s < slm.num_hidden_layers and 0 <= h < slm.num_attention_heads) for s, h, _ in mix):
                raise bad(
                    f"layer {layer} borrows {mix}, outside the SLM's {slm.num_hidden_layers} x {slm.num_attention_heads} heads"
                )
            if any(w < 0 for _, _, w in mix) or abs(sum(w for _, _, w in mix) - 1) > 1e-4:
                raise bad(f"layer {layer}'s weights {[w for _, _, w in mix]} are not non-negative with sum 1")
    if len(blends) != 1 or 0 in blends:
        raise bad(f"every head must borrow the same number (>= 1) of SLM heads, got {sorted(blends)}")
    return FixedMapping(key_llm, key_slm, plan, borrow, similarity, metric, record.get("source", {}))


def choose(
    similarity: torch.Tensor,
    plan: Plan,
    n_kv: int,
    slm_heads: int,
    llm: PretrainedConfig,
    slm: PretrainedConfig,
    metric: str,
    **source,
) -> FixedMapping:
    """The best-match (``blend`` 1) fixed mapping from ``similarity`` ``[L, H, L_s * H_s]``, every LLM head's
    similarity to every SLM head averaged over a calibration set: each mapped head borrows the SLM head it is most
    similar to on average."""
    per_kv = similarity.shape[1] // n_kv
    borrow, scores = {}, {}
    for layer, groups in plan.items():
        heads = [g * per_kv + j for g in groups for j in range(per_kv)]
        best = similarity[layer, heads].max(-1)
        borrow[layer] = [[(int(i) // slm_heads, int(i) % slm_heads, 1.0)] for i in best.indices]
        scores[layer] = best.values.tolist()
    return FixedMapping(arch_key(llm), arch_key(slm), dict(plan), borrow, scores, metric, source)
