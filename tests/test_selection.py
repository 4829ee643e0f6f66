from __future__ import annotations

import pytest
import torch

from iam.selection import STRATEGIES


def test_back_and_front():
    assert STRATEGIES["back"].select(10, 3) == [7, 8, 9]
    assert STRATEGIES["front"].select(10, 3) == [0, 1, 2]
    assert STRATEGIES["back"].select(10, 0) == []


def test_two_region_is_the_paper_rule_on_qwen2_72b():
    # 80 layers, 50%: layers 64..79 first, then from layer 16 onward.
    assert STRATEGIES["two-region"].select(80, 40) == list(range(16, 40)) + list(range(64, 80))
    assert STRATEGIES["two-region"].select(80, 10) == list(range(70, 80))
    assert STRATEGIES["two-region"].select(10, 10) == list(range(10))


def test_similar_needs_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8])
    assert STRATEGIES["similar"].select(4, 2, scores) == [1, 3]
    with pytest.raises(ValueError, match="one score per LLM layer"):
        STRATEGIES["similar"].select(4, 2, None)
