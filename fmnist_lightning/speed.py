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
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel at once.

    A training step allocates and frees a few activation tensors of several MB. With glibc's default
    thresholds those come from fresh mmap()s whose pages the kernel must fault in and zero every
    step: millions of page faults per epoch (docs/performance.md has the cost). Raising the thresholds
    turns that into plain reuse of the heap. Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def skip_missing_nvml() -> bool:
    """Stop torch from looking for the NVIDIA driver's NVML library once per optimizer step where it is absent.

    Lightning asks torch to check for GPUs through NVML (`PYTORCH_NVML_BASED_CUDA_CHECK=1`), which keeps
    fork() safe. Adam runs that check on every step; with a CUDA build of torch on a machine without the
    driver (a CPU-only machine), torch then tries to load the missing library each time and falls back to
    asking the CUDA runtime, the answer the plain check gives directly. Where the library is missing,
    this switches to the plain check: same answer, no failed load. Returns whether it did.
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
    """Everything the CLI sets before a run:

    - the allocator thresholds above (`keep_freed_memory`);
    - no per-step search for a missing NVML library (`skip_missing_nvml`);
    - Lightning's progress bar redraws every 50 steps instead of every step, which costs a visible part
      of a small step (set TQDM_MINITERS to choose);
    - `deterministic: true` no longer fills every new tensor with NaN (a debugging aid that exposes reads
      of uninitialised memory, and costs a step milliseconds); the deterministic algorithms stay on.
    """
    keep_freed_memory()
    skip_missing_nvml()
    os.environ.setdefault("TQDM_MINITERS", "50")
    torch.utils.deterministic.fill_uninitialized_memory = False


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX-512 BF16 or AMX).

    Without it, oneDNN emulates bf16 and a bf16-mixed step of this network is many times slower than an
    fp32 one; with it, faster (docs/performance.md has both).
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the fallback
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def fastest_precision(accelerator: object) -> str:
    """The precision a run gets when its config leaves `trainer.precision` unset (null).

    bf16-mixed where the device computes bf16 natively (GPUs that support it, CPUs with AVX-512 BF16 or
    AMX), 32-true elsewhere: the same accuracy here either way (docs/performance.md), so the choice is
    only about speed.
    """
    if accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accelerator in (None, "auto", "cpu"):
        return "bf16-mixed" if cpu_computes_bf16() else "32-true"
    return "32-true"
