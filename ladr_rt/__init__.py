"""ladr-rt: a low-latency runtime for masked discrete-diffusion text-to-image models.

Data flow, one module per stage:
    tokens.py -> denoiser.py (backends: eager, engines/) -> samplers.py -> vq.py -> PNG
pipeline.py strings them together; cli.py maps options onto config.py's dataclasses.
"""
from .checkpoint import load_model
from .config import ImageSpec, LadrParams, ModelConfig, SamplerConfig, TokenLayout

__all__ = ["load_model", "ImageSpec", "LadrParams", "ModelConfig", "SamplerConfig", "TokenLayout", "LadrPipeline"]


def __getattr__(name):  # keep `import ladr_rt` light
    if name == "LadrPipeline":
        from .pipeline import LadrPipeline

        return LadrPipeline
    raise AttributeError(name)
