"""Keep freed memory for reuse instead of handing it back to the kernel after every batch (glibc's malloc).

By default glibc serves blocks above its mmap threshold (at most 32 MiB, adjusted as the program runs) with fresh
pages from the kernel and unmaps them when they are freed, and it trims the heap's free top above 128 KiB. A CNN
forward on the CPU allocates and frees its activations batch after batch (16 slices at 192 px in EfficientNet-Lite0:
up to 57 MB for one layer's output), so every batch touches fresh pages that the kernel zero-fills one page fault at
a time. Measured here for ct-default on 100 slices of 512 x 512 on 2 cores: 5.8 million page faults in six rounds of
a prediction and a bare forward, and 1.55 s for the bare forward with glibc's defaults; 0.43 million and 0.76 s with
the thresholds below (compare ``lungsight bench ../shared/data/ct-volume/dicom`` with ``LUNGSIGHT_MALLOC=system``
and without).

What it costs: up to :data:`TRIM_THRESHOLD` of freed memory stays with the process between predictions (it is
reused by the next one, so resident memory does not grow with the number of predictions), and blocks below
:data:`MMAP_THRESHOLD` come from the heap. The command-line tool and the service apply it at start;
``LUNGSIGHT_MALLOC=system`` keeps glibc's defaults, and so does any ``MALLOC_*_`` or ``GLIBC_TUNABLES`` setting of
the user's own. Python API users may call :func:`tune_malloc` once themselves. Elsewhere than Linux with glibc it
does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 2**20  # blocks above this still get their own pages (a CT volume, its float copy)
TRIM_THRESHOLD = 256 * 2**20  # free heap top kept for reuse before it is given back
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); whether they were set."""
    if os.environ.get("LUNGSIGHT_MALLOC", "").strip().lower() == "system":
        return False
    if sys.platform != "linux" or any(k in os.environ for k in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt thresholds)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
