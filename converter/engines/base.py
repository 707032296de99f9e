"""The contract both engines implement: ``Engine.write(part, folder, verify) -> Written``, then
``Written.verify(folder)``. Policy (dtypes, casts, finiteness, ties, fit) comes from ``policy`` and the plan; an
engine decides only how the work is scheduled in memory."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..plan import PartPlan
from ..sources import Sources


@dataclasses.dataclass
class Written(ABC):
    """A part's weights as an engine wrote them."""

    part: PartPlan  # the plan as executed: a tie left to the merge is settled here
    hashes: dict[str, str]  # file name in the part's folder -> sha256, for files hashed while written
    precision: dict[str, dict[str, float]]  # merged key -> how much of its LoRA delta survived the cast (precision)

    @abstractmethod
    def verify(self, folder: Path) -> dict[str, Any]:
        """Check the written folder (config.json and support files written too) against the sources; return the
        figures for the manifest; raise ConvertError when something does not hold."""


class Engine(ABC):
    """Writes a part's weights (safetensors files) into a folder, as its plan says."""

    name: ClassVar[str]

    def __init__(self, sources: Sources, device: torch.device, progress: bool) -> None:
        self.sources, self.device, self.progress = sources, device, progress

    @abstractmethod
    def write(self, part: PartPlan, folder: Path, verify: bool) -> Written:
        """Write ``part``'s tensors into ``folder``; ``verify``: also record what ``Written.verify`` needs."""
