"""Host memory behaviour that changes peak RSS by gigabytes on CPUs (Linux, glibc): the
allocator's thresholds (pinned when asked, or when qorpo.memory.plan finds the default would
not fit), which allocator runs, and checkpoint files left mapped after loading.

glibc serves large blocks with mmap and returns them on free, but the first time such a block
is freed it raises its mmap threshold to that block's size (up to 32 MiB, the *dynamic*
threshold). From then on every tensor under 32 MiB comes from the heap, and memory freed there
stays resident: training a 135M model on 4 pairs x 512 tokens held ~6 GB of *free* heap at the
end of a step while torch had ~0.3 GB in use (peak RSS 9.8 GB; 2.3 GB with the thresholds
pinned — scripts/bench_memory.py measures it). Pinning both thresholds keeps tensors of 128 KiB
and more in mmap, unmapped on free, so peak RSS follows what torch really holds.

The price is speed: every large tensor then comes fresh from the kernel (page faults, zeroed
pages): 1.4-1.6x per step on SmolLM2-135M, 4 pairs x 512, packed (peak RSS 1.2 instead of
5.8-6.7 GB). jemalloc (LD_PRELOAD) gets the same peak at 1.3x; transparent huge pages, a
malloc_trim per step, one arena or a 4 MiB threshold did not do better (docs/memory.md). So
the default allocator stays, and the thresholds are pinned only where its bound would not fit
(--low-cpu-memory to force it). On a GPU the host barely allocates during training.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, NamedTuple

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's default mmap threshold, pinned


def pin_malloc_thresholds() -> bool:
    """Pin glibc's mmap and trim thresholds (a no-op elsewhere). Call before the model is
    loaded. Returns whether they were set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
    return mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1 and ok


class Resident(NamedTuple):
    """This process's resident memory now and its peak so far (bytes)."""

    now: float
    peak: float


def resident() -> Resident | None:
    """VmRSS and VmHWM from /proc/self/status; None where there is no /proc (not Linux)."""
    values: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM"):
                    values[key] = float(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        return None
    if len(values) < 2:
        return None
    return Resident(values["VmRSS"], values["VmHWM"])


def runtime_resident(quant: str) -> Resident | None:
    """What the process holds before the model loads, with the libraries training will import
    already imported: the CPU estimate's runtime term, measured instead of assumed. The same
    packages held 498 and 596 MiB here in two venvs of byte-identical files on one machine
    (`import torch` alone: 219 vs 273 MiB), so a constant cannot hold everywhere."""
    import peft  # noqa: F401  (imported by training anyway; ~150 MiB with bitsandbytes)

    if quant != "none":
        import bitsandbytes  # noqa: F401
    return resident()


def allocator() -> str:
    """The C allocator this process runs: "jemalloc" or "tcmalloc" when one was preloaded
    (LD_PRELOAD), else "glibc" on Linux; "other" elsewhere. jemalloc and tcmalloc return
    freed memory on their own, so the estimate is their peak; glibc needs the thresholds."""
    if not sys.platform.startswith("linux"):
        return "other"
    try:
        with open("/proc/self/maps") as fh:
            maps = fh.read()
    except OSError:
        return "glibc"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def _mapped_files(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files ending in `suffix` (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[-1].endswith(suffix):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        pass
    return ranges


def release_file_mappings(model: Any) -> int:
    """Copy the parameters and buffers that are still views of a mapped checkpoint file.

    Loading a checkpoint on the CPU in its own dtype is zero-copy: the embedding and the norms
    stay views of the safetensors mmap, which keeps the whole file mapped, and every page the
    4-bit quantisation read stays in the process's RSS (+0.5 GB for the demo model's 538 MB
    fp32 file). Copying the few views lets the mapping go. Returns the bytes copied.
    """
    ranges = _mapped_files()
    if not ranges:
        return 0

    def mapped(t: Any) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return t.device.type == "cpu" and any(lo <= ptr < hi for lo, hi in ranges)

    copied, seen = 0, set()  # tied weights: copy once, stay tied
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in seen and mapped(param):
                param.data = param.data.clone()
                copied += param.numel() * param.element_size()
                seen.add(id(param))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and mapped(buf):
                module._buffers[name] = buf.clone()  # (buffers have no .data to swap)
                copied += buf.numel() * buf.element_size()
    return copied
