"""Weights a QLoRA run kept in 4-bit (bitsandbytes NF4/FP4, double quantization included), dequantized by
bitsandbytes' own ``dequantize_4bit`` from the packed bytes and quantization state in the checkpoint: the base
weights as the trained model saw them (``--qlora-base dequantized``). bitsandbytes is imported only here."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import ConvertError
from .base import Sources, TensorInfo, TensorRef, TensorSource
from .pread import tensor_bytes


class DequantizedSource(TensorSource):
    """``key`` -> the dequantized weight of a packed 4-bit one (``states``: state name -> source ref)."""

    def __init__(
        self,
        sources: Sources,
        packed: Mapping[str, TensorRef],
        states: Mapping[str, Mapping[str, TensorRef]],
        shapes: Mapping[str, tuple[int, ...]],
    ) -> None:
        self.sources, self.packed, self.states, self.shapes = sources, dict(packed), dict(states), dict(shapes)
        self.path = sources.path(next(iter(self.packed.values()))) if self.packed else Path(".")

    def keys(self) -> list[str]:
        return list(self.packed)

    def info(self, key: str) -> TensorInfo:
        return TensorInfo(torch.float32, self.shapes[key])

    def origin(self, key: str) -> str:
        return "dequantized from 4-bit (bitsandbytes)"

    def _dequantize(self, key: str) -> torch.Tensor:
        try:
            import bitsandbytes.functional as bnb
        except ImportError as exc:
            raise ConvertError(
                "--qlora-base dequantized needs bitsandbytes (pip install bitsandbytes); or leave the option out "
                "to take the base weights from the base model"
            ) from exc
        packed = self.sources.read(self.packed[key])
        states = {name: self.sources.read(ref) for name, ref in self.states[key].items()}
        try:
            state = bnb.QuantState.from_dict(states, device=torch.device("cpu"))
            weight = bnb.dequantize_4bit(packed, state)
        except (ValueError, RuntimeError, KeyError, AssertionError) as exc:
            raise ConvertError(
                f"{self.path}: the 4-bit state of {key} is unreadable ({exc}); the file is damaged"
            ) from exc
        if tuple(weight.shape) != self.shapes[key]:
            raise ConvertError(
                f"{self.path}: {key} dequantizes to {tuple(weight.shape)}, the model has {self.shapes[key]}; pass "
                "--base with the config the run trained with"
            )
        return weight.float().contiguous()

    def read(self, key: str, *, writable: bool = False, pooled: bool = False) -> torch.Tensor:
        return self._dequantize(key)

    def chunks(
        self, key: str, *, pooled: bool = False, step: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        weight = self._dequantize(key)
        rows = weight.shape[0]
        step = step or rows
        for start in range(0, rows, step):
            yield start, min(rows, start + step), weight[start : start + step].contiguous()

    def crc32(self, key: str) -> int:
        return zlib.crc32(tensor_bytes(self._dequantize(key)))
