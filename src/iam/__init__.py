"""iam-llm: efficient inference through attention mapping between different-scale LLMs (arXiv 2507.11953)."""

from importlib.metadata import version

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .core.cache import IAMCache
from .core.config import MappingConfig
from .core.kernels import Kernels
from .core.mapping import Mapping
from .core.model import IAMForCausalLM
from .core.selection import STRATEGIES
from .core.similarity import METRICS

# transformers' text-generation pipeline checks a model's class name against this mapping (no auto class serves a
# pair of models): listed, IAMForCausalLM is a supported causal LM and the pipeline logs no error for it
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("iam", IAMForCausalLM.__name__)

__all__ = ["IAMCache", "IAMForCausalLM", "METRICS", "Kernels", "Mapping", "MappingConfig", "STRATEGIES"]
__version__ = version("iam-llm")  # pyproject.toml's, the one place it is written
