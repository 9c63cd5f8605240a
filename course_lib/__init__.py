"""Accelerated Generation: the helper library behind the course notebooks.

The small public API a notebook needs::

    from course_lib import load_model, describe_environment, seed_everything, benchmark, compare
"""

from course_lib.devices import apply_thread_setting, describe_environment, get_device, seed_everything
from course_lib.models import BUNDLED_MODELS, load_model, load_tokenizer
from course_lib.timing import benchmark, compare, weight_bytes

__version__ = "0.1.0"

apply_thread_setting()  # $COURSE_THREADS, if set, before any notebook runs torch

__all__ = [
    "BUNDLED_MODELS", "benchmark", "compare", "describe_environment", "get_device", "load_model",
    "load_tokenizer", "seed_everything", "weight_bytes",
]
