"""The benchmarks' ``--device`` / ``--precision``: the device, timer synchronisation, the matmul peak, the machine.

On CUDA kernels run asynchronously, so every timer is read after :func:`synchronize`; the peak that MFU is
measured against is the FLOP/s of a large matmul in the run's own dtype (bf16 on CUDA: what the tensor cores
reach in practice, below the card's data-sheet figure), measured in the same process.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch

DEVICES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda`` (the current CUDA device); ``cuda`` without CUDA: exit 2 with one line."""
    if name == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"--device cuda: CUDA is not available to torch {torch.__version__} on this machine "
                     f"(torch.version.cuda={torch.version.cuda}); run with --device cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a timer); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                repeats: int = 5) -> float:
    """FLOP/s of an ``n x n`` matmul in ``dtype`` on ``device`` (median of ``repeats`` timings).

    Default ``n``: 2048 on CPU (fp32; 1024 for bf16, which CPUs without AMX run slowly), 8192 on CUDA, where one
    timing covers 10 matmuls so that launch overhead does not count.
    """
    if n is None:
        n = 8192 if device.type == "cuda" else (2048 if dtype == torch.float32 else 1024)
    calls = 10 if device.type == "cuda" else 1
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        synchronize(device)
        times.append((time.perf_counter() - start) / calls)
    return 2 * n ** 3 / statistics.median(times)


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``), MB: the benchmarks' P5 figure, tables included."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def peak_cuda_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated by this process (MiB), ``None`` on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def machine(device: torch.device, threads: int) -> str:
    """The ``machine`` field of a benchmark report: the CPU (and threads), plus the GPU on CUDA."""
    host = f"{platform.machine()} CPU, {threads} threads"
    if device.type != "cuda":
        return host
    return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {host}"
