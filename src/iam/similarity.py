"""Similarity metrics between attention matrices (paper §3.1, Table 1).

Every metric scores flattened lower-triangular attention matrices: ``llm`` is ``[H, N]`` (one row per LLM
query head), ``slm`` is ``[S, N]`` (one row per SLM (layer, head) candidate). Higher scores are better.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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

    def rescale(self, llm: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Factor applied to each chosen SLM matrix (``[H]``); 1 unless the metric corrects magnitudes."""
        return torch.ones(llm.shape[0], dtype=llm.dtype, device=llm.device)


@dataclass(frozen=True)
class CosineSimilarity(SimilarityMetric):
    """Cosine of the angle between the two flattened matrices (the paper's default)."""

    def score(self, llm: torch.Tensor, slm: torch.Tensor) -> torch.Tensor:
        return F.normalize(llm, dim=-1) @ F.normalize(slm, dim=-1).T


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
class CosineNormSimilarity(CosineSimilarity):
    """Select by cosine, then rescale the chosen SLM matrix by ``||A_llm|| / ||A_slm||`` on the window."""

    def rescale(self, llm: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return llm.norm(dim=-1) / chosen.norm(dim=-1).clamp_min(torch.finfo(chosen.dtype).tiny)


METRICS: dict[str, SimilarityMetric] = {
    "cosine": CosineSimilarity(),
    "pearson": PearsonSimilarity(),
    "minkowski1": MinkowskiSimilarity(p=1.0),
    "minkowski2": MinkowskiSimilarity(p=2.0),
    "cosine-norm": CosineNormSimilarity(),
}
