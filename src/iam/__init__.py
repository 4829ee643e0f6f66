"""iam-llm: efficient inference through attention mapping between different-scale LLMs (arXiv 2507.11953)."""

from .config import MappingConfig
from .model import IAMModel
from .selection import STRATEGIES
from .similarity import METRICS

__all__ = ["IAMModel", "MappingConfig", "METRICS", "STRATEGIES"]
__version__ = "0.1.0"
