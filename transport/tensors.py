"""Tensors as zero-copy buffers: the sending side exposes a tensor's memory, the
receiving side wraps a received frame with ``torch.frombuffer`` (no copy).

A tensor on the wire is a header (dtype, shape, codec and its parameters; see
``transport.codecs``) plus one or more buffer frames. This module holds the raw
byte-level pieces every codec uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from transport.errors import MalformedMessage, MessageTooLarge
from transport.limits import Limits

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``.

    Raises:
        MalformedMessage: the dtype cannot travel (e.g. complex, float64).
    """
    name = DTYPE_NAMES.get(dtype)
    if name is None:
        raise MalformedMessage(f"dtype {dtype} cannot be sent; supported: {sorted(DTYPES)}")
    return name


def tensor_buffer(tensor: torch.Tensor) -> Any:
    """A buffer-protocol object sharing ``tensor``'s memory (copies only if it must).

    A non-contiguous or non-CPU tensor is copied once into contiguous CPU memory. The
    caller must not modify the tensor in place until the message has been sent.

    Args:
        tensor: any tensor of a dtype in ``DTYPES``.
    Returns:
        a contiguous numpy array over the same bytes (zero-copy for ZeroMQ).
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; same bytes as int16
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


def parse_tensor_header(header: Any, limits: Limits) -> tuple[torch.dtype, tuple[int, ...], int]:
    """Validate the dtype and shape of a tensor header.

    Args:
        header: the decoded msgpack map of one tensor.
        limits: the receiver's limits.
    Returns:
        (dtype, shape, number of elements).
    Raises:
        MalformedMessage: not a map, unknown dtype, or a shape that is not a list of
            non-negative ints.
        MessageTooLarge: too many dimensions or elements.
    """
    if not isinstance(header, dict):
        raise MalformedMessage("tensor header must be a map")
    name = header.get("dtype")
    dtype = DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise MalformedMessage(f"unknown tensor dtype {header.get('dtype')!r}")
    shape = header.get("shape")
    if not isinstance(shape, list):
        raise MalformedMessage("tensor shape must be a list")
    if len(shape) > limits.max_tensor_dims:
        raise MessageTooLarge(f"tensor has {len(shape)} dims > max_tensor_dims={limits.max_tensor_dims}")
    for size in shape:
        if type(size) is not int or size < 0:
            raise MalformedMessage(f"tensor shape {shape!r} must hold non-negative ints")
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise MessageTooLarge(
            f"tensor has {numel} elements > max_tensor_elements={limits.max_tensor_elements}"
        )
    return dtype, tuple(shape), numel


def tensor_from_buffer(buffer: Any, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """Wrap ``buffer`` as a flat tensor of ``numel`` elements without copying.

    Args:
        buffer: a writable buffer (a received ZeroMQ frame's memoryview).
        dtype: element type.
        numel: expected number of elements.
    Returns:
        a 1-d tensor sharing ``buffer``'s memory.
    Raises:
        MalformedMessage: the buffer's length does not match ``numel`` elements of ``dtype``,
            or a bool tensor holds bytes other than 0 and 1.
    """
    view = memoryview(buffer)
    expected = numel * dtype.itemsize
    if view.nbytes != expected:
        raise MalformedMessage(f"tensor frame has {view.nbytes} bytes, expected {expected}")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    if dtype == torch.bool:
        raw = torch.frombuffer(view, dtype=torch.uint8)
        if bool((raw > 1).any()):
            raise MalformedMessage("bool tensor holds bytes other than 0 and 1")
        return raw.view(torch.bool)
    return torch.frombuffer(view, dtype=dtype)
