"""What the benchmarks measure besides time: peak memory, the machine and its load, and table printing."""
from __future__ import annotations

import ctypes
import datetime
import os
import platform
import resource
import sys
from pathlib import Path

import torch

from core.runtime import processor_name

MIB = 1024.0 * 1024.0


def _rss_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def _rss_now_mib() -> float:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return _rss_peak_mib()
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def _malloc_trim() -> None:
    """Hand glibc's free heap back to the OS, so a run's peak does not include the last one's cache."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (what getrusage's ru_maxrss reads)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one timed block: RSS on the CPU, allocated CUDA memory on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = True
        self.base = 0.0

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated, reset before each block"
        if self.resettable:
            return "process peak RSS (getrusage ru_maxrss), reset before each block via /proc/self/clear_refs"
        return "process peak RSS (getrusage ru_maxrss); it could NOT be reset here, so it is the running maximum"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / MIB
            return
        _malloc_trim()
        self.resettable = _reset_rss_peak() and self.resettable
        self.base = _rss_now_mib()

    def read(self) -> tuple[float, float]:
        """(peak MiB, peak minus the level at start(): what the iterations themselves added)."""
        peak = torch.cuda.max_memory_allocated(self.device) / MIB if self.device.type == "cuda" else _rss_peak_mib()
        return peak, max(peak - self.base, 0.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def machine_lines(device: torch.device) -> list[str]:
    """Date, command, machine, device, torch threads and load: the header of every report."""
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host CPU {processor_name()}"
    else:
        machine = f"{processor_name()}, {os.cpu_count()} logical CPUs visible"
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
        f"machine: {machine}; {platform.platform()}",
        f"device: {device}",
        f"torch: {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
        f"inter-op threads {torch.get_num_interop_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        f"load average (1/5/15 min) at start: {load_average()}",
    ]


def format_table(header: list[str], rows: list[list[str]], style: str) -> str:
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header)))
                 + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in [header, *rows])


def print_block(lines: list[str], style: str) -> None:
    for line in lines:
        print(f"- {line}" if style == "markdown" else line)
