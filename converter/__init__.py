"""ckpt2hf: turn a PyTorch Lightning training run of a PEFT/LoRA model into a clean Hugging Face export.

The command line is ``ckpt2hf``; the same operations as functions (the README's "Python API"):

    import converter
    result = converter.convert("runs/panorama-7", "exports/panorama-7", dtype="bfloat16")
    assert converter.verify(result.out).ok
"""

from .api import (
    Conversion,
    ConversionPlan,
    Inspection,
    Migration,
    RunResult,
    Verification,
    convert,
    inspect,
    migrate,
    plan_conversion,
    status,
    verify,
)
from .errors import ConvertError
from .version import __version__

__all__ = [
    "Conversion",
    "ConversionPlan",
    "ConvertError",
    "Inspection",
    "Migration",
    "RunResult",
    "Verification",
    "__version__",
    "convert",
    "inspect",
    "migrate",
    "plan_conversion",
    "status",
    "verify",
]
