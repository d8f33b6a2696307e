"""Host memory behaviour that changes peak RSS by gigabytes on CPUs (Linux, glibc): the
allocator's thresholds (opt-in) and checkpoint files left mapped after loading.

glibc serves large blocks with mmap and returns them on free, but the first time such a block
is freed it raises its mmap threshold to that block's size (up to 32 MiB, the *dynamic*
threshold). From then on every tensor under 32 MiB comes from the heap, and memory freed there
stays resident: training a 135M model on 4 pairs x 512 tokens held ~6 GB of *free* heap at the
end of a step while torch had ~0.3 GB in use (peak RSS 9.8 GB; 2.3 GB with the thresholds
pinned — scripts/bench_memory.py measures it). Pinning both thresholds keeps tensors of 128 KiB
and more in mmap, unmapped on free, so peak RSS follows what torch really holds.

The price is speed: every large tensor then comes fresh from the kernel (page faults, zeroed
pages). The same CPU run (SmolLM2-135M, 4 pairs x 512, packed) took 85.5 s instead of 60.5 s
for 3.1 GB instead of 6.7-7.9 GB peak RSS, so it is an option (--low-cpu-memory), not the
default. On a GPU the host barely allocates during training: it changes nothing there.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

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
