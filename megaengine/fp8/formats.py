"""The two FP8 formats (OCP FP8: e4m3fn and e5m2), with the numbers the scaling and the error bounds need.

Everything is read off torch.finfo: e4m3fn has 3 mantissa bits, largest finite value 448, no infinities;
e5m2 has 2 mantissa bits and reaches 57344. Rounding to nearest makes the relative error of a value in the
normal range at most the unit roundoff 2^-(mantissa bits + 1): 2^-4 for e4m3, 2^-3 for e5m2. Below the
smallest normal the spacing is the smallest subnormal, so the absolute error there is at most half of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FP8Format:
    name: str
    dtype: torch.dtype

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def mantissa_bits(self) -> int:
        return round(-torch.log2(torch.tensor(torch.finfo(self.dtype).eps)).item())

    @property
    def unit_roundoff(self) -> float:
        """Largest relative rounding error of a value in the normal range."""
        return 2.0 ** -(self.mantissa_bits + 1)

    @property
    def min_subnormal(self) -> float:
        return float(torch.finfo(self.dtype).smallest_normal) * 2.0 ** -self.mantissa_bits


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn)
E5M2 = FP8Format("e5m2", torch.float8_e5m2)

# --fp8-format: the format of (inputs and weights, gradients). "hybrid" is Transformer Engine's: e4m3 forward
# for precision, e5m2 backward for the wider range gradients need.
FORMATS = {"e4m3": (E4M3, E4M3), "hybrid": (E4M3, E5M2)}
