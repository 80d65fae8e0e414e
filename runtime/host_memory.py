"""Host memory for training on the CPU: freed memory kept in the process for the next step.

glibc's malloc serves an allocation above its mmap threshold (128 KiB at first, raised as large
blocks are freed) with fresh pages from the kernel, and hands them back when the block is freed;
it also trims the top of its heap back to the kernel once the free space there passes its trim
threshold. A training step on the CPU allocates and frees the same activations, gradients and
temporaries every step, so every step the kernel maps and zeroes their pages again: at the main
example's shape in bf16-mixed about 4,300 page faults a step, and the step 1.13x to 1.15x slower
(docs/development.md, "Host memory").

``keep_freed_memory()`` sets glibc's two thresholds (``mallopt``): allocations up to 32 MiB
(glibc's largest mmap threshold) come from the heap, and freed memory stays there for the next
step. The process keeps the memory of its largest step, as torch's CUDA caching allocator keeps
the GPU's. It changes nothing where malloc is not glibc's (another C library, or an allocator such
as jemalloc or tcmalloc preloaded), or where glibc's malloc options are set in the environment:
those are the user's choice.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Mapping, Optional

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 << 20
# mallopt takes an int: the largest, so that the heap's top is never trimmed
TRIM_THRESHOLD = 2**31 - 1
# the environment variables that set glibc's malloc options (glibc.malloc.* in GLIBC_TUNABLES too)
MALLOC_ENVIRONMENT = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
)


def malloc_environment(environ: Mapping[str, str]) -> list[str]:
    """The environment variables of ENVIRON that set glibc's malloc options."""
    names = [name for name in MALLOC_ENVIRONMENT if name in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return names


def glibc() -> Optional[ctypes.CDLL]:
    """glibc, when it is this process's C library and its malloc is the one the process calls
    (not replaced by a preloaded allocator); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc's own function (musl and others have none)
        process = ctypes.CDLL(None)  # the symbols the process resolves, preloaded libraries first
    except (OSError, AttributeError):
        return None
    own, called = (ctypes.cast(lib.malloc, ctypes.c_void_p).value for lib in (libc, process))
    return libc if own == called else None


def keep_freed_memory(environ: Optional[Mapping[str, str]] = None) -> str:
    """Keep freed host memory in the process (see the module's docstring); returns a line saying
    what was done, or why nothing was. Calling it again changes nothing more."""
    environ = os.environ if environ is None else environ
    chosen = malloc_environment(environ)
    if chosen:
        return f"host memory: malloc as the environment sets it ({', '.join(chosen)})"
    libc = glibc()
    if libc is None:
        return "host memory: malloc is not glibc's, left as it is"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "host memory: glibc refused the malloc options, left as it is"
    return "host memory: freed memory kept for the next step (glibc malloc: heap up to 32 MiB, no trimming)"
