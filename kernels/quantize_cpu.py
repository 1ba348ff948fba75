"""Fast CPU path for blockwise quantization: a small C library, threaded from Python.

Why C through ctypes and not a torch C++ extension: the C file includes no torch
headers, so it compiles in well under a second with the system compiler on first use
(a ``load_inline`` build takes a minute), and a fresh CI machine needs nothing but
``cc``. The library is cached under ``$SWARM_KERNELS_CACHE`` (default
``~/.cache/swarm/kernels``), keyed by a hash of the source, the flags and the CPU.
Threads: ctypes releases the GIL during the call, so a thread pool of
``torch.get_num_threads()`` workers splits the blocks between cores.

Results are bit-identical to the reference in ``kernels.quantize``: the C code does
the same float32 operations in the same order (``-ffp-contract=off`` keeps the
compiler from fusing multiply-adds, and rounding is round-half-to-even like
``torch.round``). If no compiler works, a log line says so and callers fall back to
:mod:`kernels.quantize` chunked torch code.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kernels import _quantize_c

log = logging.getLogger(__name__)

_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"],
    ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"],  # compilers without -march=native
)
_SMALL = 1 << 18  # elements: below this a single call beats handing work to threads
_CONVERT_CHUNK = 1 << 16  # elements converted to/from float32 at a time (stays in L2)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_failed = False
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    root = os.environ.get("SWARM_KERNELS_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swarm" / "kernels"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile(target: Path) -> bool:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("kernels: no C compiler found; blockwise quantization uses the torch path")
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "quantize.c"
        source.write_text(_quantize_c.SOURCE, encoding="utf-8")
        for flags in _FLAG_SETS:
            output = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", str(output), "-lm"], capture_output=True, text=True
            )
            if result.returncode == 0:
                os.replace(output, target)  # atomic: concurrent builders never see half a file
                return True
            error = result.stderr.strip()[-500:]
        log.warning("kernels: compiling the quantize library failed (%s); using the torch path", error)
    return False


def load_library() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None when that is impossible."""
    global _library, _load_failed
    if _library is not None or _load_failed:
        return _library
    with _lock:
        if _library is not None or _load_failed:
            return _library
        if os.environ.get("SWARM_KERNELS_NO_NATIVE"):
            _load_failed = True
            return None
        key = hashlib.sha256(
            "|".join([_quantize_c.SOURCE, repr(_FLAG_SETS), platform.machine(), _cpu_name()]).encode()
        ).hexdigest()[:16]
        target = _cache_dir() / f"swarm_quantize_{key}.so"
        try:
            if not target.exists() and not _compile(target):
                _load_failed = True
                return None
            library = ctypes.CDLL(str(target))
        except OSError as error:
            log.warning("kernels: loading %s failed (%s); using the torch path", target, error)
            _load_failed = True
            return None
        _quantize_c.declare(library)
        _library = library
        return _library


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="swarm-quantize")
        return _pool


def _run_blocks(numel: int, block_size: int, work) -> None:
    """Call ``work(start, stop)`` over element ranges cut at block boundaries, in parallel."""
    workers = max(1, torch.get_num_threads())
    if numel <= _SMALL or workers == 1:
        work(0, numel)
        return
    num_blocks = -(-numel // block_size)
    per_worker = -(-num_blocks // workers) * block_size
    ranges = [(lo, min(lo + per_worker, numel)) for lo in range(0, numel, per_worker)]
    for future in [_threads().submit(work, lo, hi) for lo, hi in ranges]:
        future.result()


def _pointer(tensor: torch.Tensor, offset: int = 0) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() + offset * tensor.element_size())


def _chunk_elements(block_size: int) -> int:
    """Unit of work and of dtype conversion: whole blocks, about _CONVERT_CHUNK elements."""
    return block_size * max(1, _CONVERT_CHUNK // block_size)


def _float_chunks(x: torch.Tensor, lo: int, hi: int, chunk: int):
    """Yield (start, float32 x[start:stop]); converts ``chunk`` elements at a time unless float32."""
    if x.dtype == torch.float32:
        yield lo, x[lo:hi]
        return
    for start in range(lo, hi, chunk):
        yield start, x[start : min(start + chunk, hi)].to(torch.float32)


def quantize_int8(
    library: ctypes.CDLL, x: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1).contiguous()
    numel = flat.numel()
    codes = torch.empty(numel, dtype=torch.int8)
    scales = torch.empty(-(-numel // block_size), dtype=torch.float32)

    def work(lo: int, hi: int) -> None:
        for start, chunk in _float_chunks(flat, lo, hi, _chunk_elements(block_size)):
            library.swarm_quantize_int8(
                _pointer(chunk),
                chunk.numel(),
                block_size,
                _pointer(codes, start),
                _pointer(scales, start // block_size),
            )

    _run_blocks(numel, _chunk_elements(block_size), work)
    return codes, scales


def dequantize_int8(
    library: ctypes.CDLL,
    codes: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    codes = codes.reshape(-1).contiguous()
    scales = scales.to(torch.float32).contiguous()
    numel = codes.numel()
    out = torch.empty(numel, dtype=dtype) if out is None else out

    def work(lo: int, hi: int) -> None:
        _decode_into(out, lo, hi, _chunk_elements(block_size), lambda start, stop, target: library.swarm_dequantize_int8(
            _pointer(codes, start), stop - start, block_size, _pointer(scales, start // block_size), _pointer(target)))  # fmt: skip

    _run_blocks(numel, _chunk_elements(block_size), work)
    return out


def quantize_4bit(
    library: ctypes.CDLL, x: torch.Tensor, block_size: int, levels: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1).contiguous()
    numel = flat.numel()
    packed = torch.empty(-(-numel // 2), dtype=torch.uint8)
    scales = torch.empty(-(-numel // block_size), dtype=torch.float32)
    levels = levels.to(torch.float32).contiguous()
    use_int4 = 1 if kind == "int4" else 0

    def work(lo: int, hi: int) -> None:
        for start, chunk in _float_chunks(flat, lo, hi, _chunk_elements(block_size)):
            library.swarm_quantize_4bit(
                _pointer(chunk), chunk.numel(), block_size, _pointer(levels), use_int4,
                _pointer(packed, start // 2), _pointer(scales, start // block_size),
            )  # fmt: skip

    _run_blocks(numel, _chunk_elements(block_size), work)
    return packed, scales


def dequantize_4bit(
    library: ctypes.CDLL,
    packed: torch.Tensor,
    scales: torch.Tensor,
    numel: int,
    block_size: int,
    levels: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    packed = packed.reshape(-1).contiguous()
    scales = scales.to(torch.float32).contiguous()
    levels = levels.to(torch.float32).contiguous()
    out = torch.empty(numel, dtype=dtype)

    def work(lo: int, hi: int) -> None:
        _decode_into(out, lo, hi, _chunk_elements(block_size), lambda start, stop, target: library.swarm_dequantize_4bit(
            _pointer(packed, start // 2), stop - start, block_size, _pointer(scales, start // block_size),
            _pointer(levels), _pointer(target)))  # fmt: skip

    _run_blocks(numel, _chunk_elements(block_size), work)
    return out


def _decode_into(out: torch.Tensor, lo: int, hi: int, chunk: int, decode) -> None:
    """Run ``decode(start, stop, float32 target)`` straight into ``out`` or via float32 chunks."""
    if out.dtype == torch.float32:
        decode(lo, hi, out[lo:hi])
        return
    scratch = torch.empty(min(chunk, hi - lo), dtype=torch.float32)
    for start in range(lo, hi, chunk):
        stop = min(start + chunk, hi)
        decode(start, stop, scratch)
        out[start:stop].copy_(scratch[: stop - start])
