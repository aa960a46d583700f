"""How many CPU cores this process may use, and whether PyTorch's threads leave one over."""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def spare_core() -> bool:
    """Whether a core is left over by PyTorch's intra-op threads, so that a worker thread can run beside them."""
    return torch.get_num_threads() < usable_cores()
