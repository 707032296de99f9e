"""ckpt2hf: turn a PyTorch Lightning training run of a PEFT/LoRA model into a clean Hugging Face export.

The command line is ``ckpt2hf``; the same operations as functions (the README's "Python API"):

    import converter
    result = converter.convert("runs/panorama-7", "exports/panorama-7", dtype="bfloat16")
    assert converter.verify(result.out).ok
"""

from . import api
from .api import *  # noqa: F403 - the API is api.__all__
from .errors import ConvertError
from .version import __version__

__all__ = [*api.__all__, "ConvertError", "__version__"]
