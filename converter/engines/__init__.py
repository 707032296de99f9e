"""The engines that execute a plan: ``full`` (whole-model ``merge_and_unload``) and ``streaming`` (layer by
layer, in bounded memory). Both implement ``Engine`` and write identical tensors."""

from .base import Engine, Written
from .full import FullEngine
from .streaming import StreamingEngine

ENGINES: dict[str, type[Engine]] = {engine.name: engine for engine in (FullEngine, StreamingEngine)}

__all__ = ["ENGINES", "Engine", "FullEngine", "StreamingEngine", "Written"]
