"""Blockwise quantization speed against plain memcpy, measured in the same run.

    python benchmarks/kernels.py --quick

Input: a 256 MiB float32 tensor. Rates are input bytes per second (GB = 1e9 bytes),
medians of several repeats. The last line is machine-readable:
    kernels quantize_gbps=... memcpy_gbps=... ratio=<fast/memcpy> vs_reference=<fast/reference>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script, this folder comes first on sys.path and this file would shadow the
# kernels package: put the repository root there instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from kernels import quantize as q
from kernels.quantized_linear import QuantizedLinear


def _read_steal() -> tuple[int, int]:
    """(steal, total) jiffies from /proc/stat; (0, 0) where there is none."""
    try:
        with open("/proc/stat", encoding="utf-8") as file:
            fields = [int(v) for v in file.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up: first-touch page faults, library build, thread pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (well under 60 s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mib", type=int, default=256, help="input size in MiB of float32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, reference_repeats = (5, 2) if args.quick else (11, 5)

    numel = args.mib * (1 << 20) // 4
    nbytes = numel * 4
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    target = torch.empty_like(x)
    codes, scales = q.quantize_blockwise_int8(x)
    packed, scales4 = q.quantize_blockwise_4bit(x)
    steal_before = _read_steal()

    rows: list[tuple[str, float]] = []

    def measure(name: str, function, count: int = repeats, size: int = nbytes) -> float:
        rate = size / _median_seconds(function, count) / 1e9
        rows.append((name, rate))
        return rate

    memcpy = measure("memcpy (copy_ into preallocated)", lambda: target.copy_(x))
    reference = measure(
        "int8 quantize, reference", lambda: q.quantize_blockwise_int8_reference(x), reference_repeats
    )
    fast = measure("int8 quantize, fast path", lambda: q.quantize_blockwise_int8(x))
    measure("nf4 quantize, fast path", lambda: q.quantize_blockwise_4bit(x, kind="nf4"))
    measure("int4 quantize, fast path", lambda: q.quantize_blockwise_4bit(x, kind="int4"))
    measure("int8 dequantize, fast path (output bytes)", lambda: q.dequantize_blockwise_int8(codes, scales))
    measure(
        "nf4 dequantize, fast path (output bytes)",
        lambda: q.dequantize_blockwise_4bit(packed, scales4, numel),
    )
    small = x[: 1 << 20]  # the reference 4-bit path is too slow and memory hungry for 256 MiB
    measure(
        "nf4 quantize, reference (4 MiB)",
        lambda: q.quantize_blockwise_4bit_reference(small),
        3,
        small.numel() * 4,
    )

    # Weight-only quantized linear vs float linear, one decode-sized batch.
    linear = torch.nn.Linear(4096, 4096, bias=False)
    activations = torch.randn(8, 4096)
    with torch.no_grad():
        float_seconds = _median_seconds(lambda: F.linear(activations, linear.weight), repeats)
        linear_rows = []
        for kind in ("int8", "nf4"):
            layer = QuantizedLinear(linear, kind)
            linear_rows.append((kind, _median_seconds(lambda layer=layer: layer(activations), repeats)))

    steal_after = _read_steal()
    steal_total = steal_after[1] - steal_before[1]
    steal = 100.0 * (steal_after[0] - steal_before[0]) / steal_total if steal_total else 0.0

    print(f"threads={torch.get_num_threads()}  input={args.mib} MiB float32  steal={steal:.1f}% of CPU time")
    print(f"{'measurement':<44} {'GB/s':>8}")
    for name, rate in rows:
        print(f"{name:<44} {rate:8.2f}")
    print(f"{'linear 4096x4096, batch 8':<44} {'ms':>8}")
    print(f"{'  float32 F.linear':<44} {float_seconds * 1e3:8.2f}")
    for kind, seconds in linear_rows:
        print(f"{'  quantized ' + kind + ' (dequantize + linear)':<44} {seconds * 1e3:8.2f}  "
              f"({seconds / float_seconds:.1f}x float)")  # fmt: skip
    print(
        f"kernels quantize_gbps={fast:.2f} memcpy_gbps={memcpy:.2f} "
        f"ratio={fast / memcpy:.2f} vs_reference={fast / reference:.1f}"
    )


if __name__ == "__main__":
    main()
