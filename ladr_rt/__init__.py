"""ladr-rt: a low-latency runtime for masked discrete-diffusion text-to-image models.

Data flow, one module per stage:
    tokens.py -> denoiser.py (backends: eager, engines/) -> samplers.py -> vq.py -> PNG
pipeline.py strings them together; cli.py maps options onto config.py's dataclasses.
"""
from .config import ImageSpec, LadrParams, ModelConfig, SamplerConfig, TokenLayout

__all__ = ["load_model", "ImageSpec", "LadrParams", "ModelConfig", "SamplerConfig", "TokenLayout", "LadrPipeline"]


def __getattr__(name):  # keep `import ladr_rt` light: torch loads on first use (`ladr-rt --help` needs none)
    if name == "LadrPipeline":
        from .pipeline import LadrPipeline

        return LadrPipeline
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    raise AttributeError(name)
