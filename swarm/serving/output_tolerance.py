"""How far two honest servers' outputs for the same blocks may differ, from what they announce.

A server's *kind* is what its record says about how it computes: device type, dtype and
weight quantization. Two kinds are compared at a tolerance on the relative error of each
output vector (one row at one position, over the hidden dimension)::

    error = max over (row, position) of ||a - b|| / ||b||

The tolerances below are measured on the tiny random Llama the tests use (4 blocks,
hidden 64: random weights are the hardest case for quantization), with ~2-3x margin;
``tests/test_serving_verification.py`` measures the false-alarm rate between real
servers of these kinds (0 of the checks it makes):

| kinds compared                                    | measured max error | tolerance |
|---------------------------------------------------|--------------------|-----------|
| float32, same device type (cache vs no cache)     | ~1e-6              | 1e-3      |
| float16 vs float32 / float16                      | 0.004              | 0.02      |
| bfloat16 vs float32 / bfloat16                    | 0.026              | 0.06      |
| int8 vs unquantized, or vs int8 of another dtype  | 0.045-0.053        | +0.1      |
| 4-bit (nf4, int4, GGUF ``keep``) vs anything else | 0.62-0.75          | none      |

A 4-bit server is therefore only compared with servers of exactly its own kind (its
error against full precision is as large as a real fault), and so is a server whose
record does not say how it quantizes (an older peer). Different device types add a
floor of 1e-2 (other kernels, TF32 on GPUs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from swarm import ServerRecord

DTYPE_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}
"""Relative error between two servers of this dtype, or this dtype and a more precise one."""
INT8_TOLERANCE = 0.1
"""Added when exactly one side is int8-quantized, or both are but in different dtypes."""
DEVICE_FLOOR = 1e-2
"""Least tolerance between different device types."""
_EXACT_ONLY = {"nf4", "int4", "keep", ""}  # compared only with their own kind


class ServerKind(NamedTuple):
    """How a server computes, as its record announces it."""

    device: str
    dtype: str
    quant: str

    @classmethod
    def of(cls, record: ServerRecord) -> ServerKind:
        return cls(record.device.split(":", 1)[0], record.dtype, record.quant)


def tolerance(a: ServerKind, b: ServerKind) -> float | None:
    """The relative error allowed between honest servers of kinds ``a`` and ``b``, or None
    when they cannot be compared at a useful tolerance (then they are never paired)."""
    if (a.quant in _EXACT_ONLY or b.quant in _EXACT_ONLY) and a != b:
        return None
    if a.dtype not in DTYPE_TOLERANCE or b.dtype not in DTYPE_TOLERANCE:
        return None
    allowed = max(DTYPE_TOLERANCE[a.dtype], DTYPE_TOLERANCE[b.dtype])
    if (a.quant == "int8") != (b.quant == "int8") or (a.quant == "int8" and a.dtype != b.dtype):
        allowed += INT8_TOLERANCE
    if a.device != b.device:
        allowed = max(allowed, DEVICE_FLOOR)
    return allowed


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Max over (row, position) of ``||output - reference|| / ||reference||``; inf on a shape
    mismatch or a non-finite value (an honest server never sends one)."""
    if output.shape != reference.shape:
        return float("inf")
    if not output.numel():
        return 0.0
    output, reference = output.float(), reference.float()
    # a non-finite value on either side makes a ratio inf or nan (one check, not two scans)
    error = float(((output - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)).max())
    return error if math.isfinite(error) else float("inf")
