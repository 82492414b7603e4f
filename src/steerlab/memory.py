"""Keep long CPU passes from growing their resident memory.

Streaming passes allocate the same large transient buffers (logits, activations, gradients) batch after
batch while small long-lived tensors (caches, running sums) accumulate between them. glibc's allocator
then keeps the freed pages of the fragmented heap, so the resident set grows with the number of batches
(measured: 3.5 GB instead of 2.6 GB after 16 batches of SmolLM2 influence scoring). `release_free_memory`
hands those pages back to the operating system; passes call it every few batches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def release_free_memory(every: int = 1) -> None:
    """Return the free pages of the C heap to the OS (glibc `malloc_trim(0)`); a no-op elsewhere.
    `every=n`: only on every n-th call (pages handed back must be faulted in again by the next batch,
    about 0.2 s per GB, so per-batch callers trim every few batches)."""
    global _calls
    _calls += 1
    trim = _malloc_trim()
    if trim is not None and _calls % every == 0:
        trim(0)


_calls = 0
