"""Peak-memory probes per phase: GPU allocator peaks on CUDA, resident-set peaks (VmHWM) on the CPU."""

from __future__ import annotations

import torch


def _cpu_peak_reset_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the resident-set high-water mark (VmHWM) of this process
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so the resident set reflects live memory, not what the
    allocator kept: loading SmolLM2 from GGUF leaves ~4 GiB of freed-but-retained heap otherwise."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak(device: torch.device) -> None:
    """Start a new measurement window on ``device``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _malloc_trim()
        _cpu_peak_reset_supported()


def peak_bytes(device: torch.device) -> int:
    """Peak since the last :func:`reset_peak`: allocated CUDA bytes, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
