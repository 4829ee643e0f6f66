"""iam-llm: efficient inference through attention mapping between different-scale LLMs (arXiv 2507.11953)."""

from .core.cache import IAMCache
from .core.config import MappingConfig
from .core.mapping import Mapping
from .core.model import IAMForCausalLM
from .core.selection import STRATEGIES
from .core.similarity import METRICS

__all__ = ["IAMCache", "IAMForCausalLM", "METRICS", "Mapping", "MappingConfig", "STRATEGIES"]
__version__ = "0.2.0"
