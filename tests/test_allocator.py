"""glibc's malloc keeps freed batch-sized blocks for reuse once tuned, so a loop of allocations stops page-faulting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lungsight.allocator import tune_malloc

# Allocate, touch and free a 48 MB block 20 times (one layer's output for a batch of 16 slices of 192 px reaches
# 57 MB in EfficientNet-Lite0: above glibc's largest default mmap threshold, 32 MiB); print the page faults.
# torch, as in the forward: NumPy asks for transparent huge pages on large arrays, which hides the faults' count.
PROBE = """
import resource
import torch
from lungsight.allocator import tune_malloc
print(tune_malloc())
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = torch.ones(12_000_000)
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LUNGSIGHT_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=clean | env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def _glibc() -> bool:
    return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION") is not None


@pytest.mark.skipif(not _glibc(), reason="the thresholds are glibc's")
def test_tuned_malloc_reuses_freed_blocks_instead_of_faulting_in_fresh_pages() -> None:
    tuned, tuned_faults = _probe()
    default, default_faults = _probe(LUNGSIGHT_MALLOC="system")
    assert tuned and not default
    # untuned: every round faults in 48 MB of fresh pages (about 11,700 faults of 4 KiB); tuned: the first only
    if default_faults < 20 * 8000:
        pytest.skip(f"{default_faults} faults untuned: this kernel backs the blocks with huge pages, which hides reuse")
    assert tuned_faults < default_faults / 5


def test_the_user_s_own_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGSIGHT_MALLOC", "system")
    assert tune_malloc() is False
    monkeypatch.delenv("LUNGSIGHT_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert tune_malloc() is False
