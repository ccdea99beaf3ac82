"""The inference engine: tokenizer -> ONNX Runtime -> N samples per input.

Plain Python (numpy, onnxruntime, tokenizers, jinja2): nothing here imports Django, so the engine can be
benchmarked, tested and reused on its own.
"""

from .generate import Engine, Generation, Sample, SamplingParams
from .runtime import ModelLoadError, ProviderUnavailable, create_session

__all__ = [
    "Engine",
    "Generation",
    "Sample",
    "SamplingParams",
    "ModelLoadError",
    "ProviderUnavailable",
    "create_session",
]
