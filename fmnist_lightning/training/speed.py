"""Process-wide settings that make training faster without changing a single number."""

import ctypes
import ctypes.util
import os

import torch

# glibc's mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 2**20
TRIM_THRESHOLD_BYTES = 512 * 2**20

# Set to "1" by `import lightning`: torch.cuda.is_available() then asks the NVIDIA driver's NVML library.
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
NVML_LIBRARY = "libnvidia-ml.so.1"  # the name torch loads


def keep_freed_memory() -> bool:
    """Let glibc reuse freed memory rather than return it; False where the C library is not glibc.

    By default each step's multi-MB activations come from fresh mmap()s the kernel must fault in and zero.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def skip_missing_nvml() -> bool:
    """Where NVML is missing, use torch's plain CUDA check (same answer); returns whether it switched.

    Adam checks for GPUs every step, and a CUDA torch without the driver would retry loading NVML each time.
    """
    if os.environ.get(NVML_CHECK_ENV) != "1":
        return False
    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        os.environ[NVML_CHECK_ENV] = "0"
        return True
    return False


def configure_runtime() -> None:
    """Everything the CLI sets before a run; none of it changes a number."""
    keep_freed_memory()
    skip_missing_nvml()
    os.environ.setdefault("TQDM_MINITERS", "50")  # a progress bar redraw per step is costly next to a small step
    # `deterministic: true` would NaN-fill every new tensor (a debugging aid); the deterministic algorithms stay on.
    torch.utils.deterministic.fill_uninitialized_memory = False


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX-512 BF16 or AMX); without it oneDNN emulates bf16."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the fallback
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def fastest_precision(accelerator: object) -> str:
    """The precision when `trainer.precision` is unset: bf16-mixed where the device computes bf16 natively.

    Accuracy is the same either way (docs/performance.md), so the choice is only about speed.
    """
    if accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accelerator in (None, "auto", "cpu"):
        return "bf16-mixed" if cpu_computes_bf16() else "32-true"
    return "32-true"
