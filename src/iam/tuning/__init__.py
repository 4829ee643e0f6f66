"""Tuning the SLM through the mapped LLM's loss (paper Appendix A): ``iam tune``."""

from .data import TuningData, load_tuning_data, tuning_data
from .train import TuneConfig, tune_slm

__all__ = ["TuneConfig", "TuningData", "load_tuning_data", "tune_slm", "tuning_data"]
