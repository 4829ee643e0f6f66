"""Similarity metrics between attention matrices (paper §3.1, Table 1).

Every metric scores flattened lower-triangular attention matrices: ``llm`` is ``[H, N]`` (one row per LLM
query head), ``slm`` is ``[S, N]`` (one row per SLM (layer, head) candidate). Higher scores are better.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SimilarityMetric(ABC):
    """Base class: scores every LLM head against every SLM candidate."""

    @abstractmethod
    def score(self, llm: torch.Tensor, slm: torch.Tensor) -> torch.Tensor:
        """
        Parameters
        ----------
        llm : ``[H, N]`` flattened attention of the LLM heads.
        slm : ``[S, N]`` flattened attention of the SLM candidates.

        Returns
        -------
        ``[H, S]`` scores, higher meaning more similar.
        """

    def against(self, slm: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``score(llm, slm)`` as a function of ``llm``, with what depends on ``slm`` alone computed once (every
        mapped layer matches against the same SLM candidates)."""
        return lambda llm: self.score(llm, slm)


@dataclass(frozen=True)
class CosineSimilarity(SimilarityMetric):
    """Cosine of the angle between the two flattened matrices (the paper's default)."""

    def score(self, llm: torch.Tensor, slm: torch.Tensor) -> torch.Tensor:
        return F.normalize(llm, dim=-1) @ F.normalize(slm, dim=-1).T

    def against(self, slm: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        unit = F.normalize(slm, dim=-1).T
        return lambda llm: F.normalize(llm, dim=-1) @ unit


@dataclass(frozen=True)
class PearsonSimilarity(SimilarityMetric):
    """Pearson correlation: cosine after removing each row's mean."""

    def score(self, llm: torch.Tensor, slm: torch.Tensor) -> torch.Tensor:
        return CosineSimilarity().score(llm - llm.mean(-1, keepdim=True), slm - slm.mean(-1, keepdim=True))


@dataclass(frozen=True)
class MinkowskiSimilarity(SimilarityMetric):
    """Negative Minkowski distance of order ``p`` (``p=1`` Manhattan, ``p=2`` Euclidean)."""

    p: float = 2.0

    def score(self, llm: torch.Tensor, slm: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(llm, slm, p=self.p)


@dataclass(frozen=True)
class CosineNormSimilarity(SimilarityMetric):
    """Cosine times the ratio of the smaller to the larger norm: direction and magnitude must both match (a
    peaked head has a larger norm than a diffuse one). The chosen SLM probabilities are used as they are, so
    every attention row still sums to one."""

    def score(self, llm: torch.Tensor, slm: torch.Tensor) -> torch.Tensor:
        a, b = llm.norm(dim=-1)[:, None], slm.norm(dim=-1)[None]
        ratio = torch.minimum(a, b) / torch.maximum(a, b).clamp_min(torch.finfo(llm.dtype).tiny)
        return CosineSimilarity().score(llm, slm) * ratio


METRICS: dict[str, SimilarityMetric] = {
    "cosine": CosineSimilarity(),
    "pearson": PearsonSimilarity(),
    "minkowski1": MinkowskiSimilarity(p=1.0),
    "minkowski2": MinkowskiSimilarity(p=2.0),
    "cosine-norm": CosineNormSimilarity(),
}
