"""The CPU kernel of ``fgc_runtime.optim.AdamW(fused=True)``: the fused step written in C, built
with the machine's C compiler the first time a process needs it.

Why C: torch.compile's kernel for the step on bf16 weights runs at a third of the speed of this
one on the CPU (its bit casts between fp32 and int32 go through a scalar loop, and it writes the
bf16 weights with masked vector stores that stall the loads after them; see
docs/development.md#the-optimizer-step-alone). The compiler vectorises the loop below itself.

What it computes: the step of :func:`fgc_runtime.optim._fused_adamw_step`, operation for
operation in fp32 and built with ``-ffp-contract=off`` (no multiply-add contracted into one
rounding), so that its weights and state are bitwise those of the compiled function (tested);
its stochastic rounding draws the same bits (:func:`fgc_runtime.optim.hashed_rounding_bits`,
its int64 hash computed in uint32, where it wraps the same way). Weights fp32 or bf16, gradients
fp32 or bf16, contiguous CPU tensors; other tensors take the compiled function.

How it is built: the source below is written into a new temporary directory, compiled into a
shared library (``cc``, else ``gcc``, else ``clang``; with ``-march=native`` and OpenMP where
the compiler takes them, else without), loaded, and the two files and the directory it made are
removed. Nothing is cached on disk; a build takes a fraction of a second. When no compiler
builds it, :func:`library` says why and the step falls back to the compiled function.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from array import array
from typing import Optional, Sequence

import torch

# the kernel's tensor flags
STOCHASTIC = 1  # bf16 weights rounded stochastically
PARAM_BF16 = 2
GRAD_BF16 = 4
DTYPES = (torch.float32, torch.bfloat16)  # of the weights and the gradients it steps

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define STOCHASTIC 1
#define PARAM_BF16 2
#define GRAD_BF16 4
#define CHUNK 16384 /* values a task */

/* one tensor: the addresses of its weights, gradient, two states and step count (an fp32
   scalar), its size, rounding key and flags */
typedef struct {
    int64_t param, grad, exp_avg, exp_avg_sq, step, numel, key, flags;
} fgc_tensor;

static inline float float_of_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of_float(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* fgc_runtime.optim._mix32 in uint32 (the int64 version masks every product to 32 bits) */
static inline uint32_t mix32(uint32_t x) {
    x = (x ^ (x >> 16)) * 0x45D9F3Bu;
    x = (x ^ (x >> 16)) * 0x45D9F3Bu;
    return x ^ (x >> 16);
}

static inline int is_nan(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }

/* fp32 to bf16, to nearest even; nan to 0xFFFF, as torch's vectorised conversion on the CPU */
static inline uint16_t bf16_nearest(uint32_t u) {
    return is_nan(u) ? (uint16_t)0xFFFFu : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* fp32 to bf16 with 16 random bits added below bf16's last bit (inf and nan as to nearest) */
static inline uint16_t bf16_stochastic(uint32_t u, uint32_t bits) {
    int finite = (u & 0x7F800000u) != 0x7F800000u;
    return finite ? (uint16_t)((u + bits) >> 16) : bf16_nearest(u);
}

/* the values [begin, end) of one tensor; FLAGS a constant where it is inlined, so that each kind
   of tensor gets a loop of its own without branches, which the compiler vectorises */
static inline __attribute__((always_inline)) void step_values(
    const fgc_tensor *t, int64_t begin, int64_t end, const float *s, const int flags) {
    float *restrict m = (float *)(intptr_t)t->exp_avg;
    float *restrict v = (float *)(intptr_t)t->exp_avg_sq;
    uint16_t *restrict p16 = (uint16_t *)(intptr_t)t->param;
    float *restrict p32 = (float *)(intptr_t)t->param;
    const uint16_t *restrict g16 = (const uint16_t *)(intptr_t)t->grad;
    const float *restrict g32 = (const float *)(intptr_t)t->grad;
    const uint32_t key = (uint32_t)t->key;
    /* the scalars of _fused_adamw_step, in its order */
    const float decay = s[0], weight = s[1], beta2 = s[2], one_minus_beta2 = s[3];
    const float step_size = s[4], bias2_sqrt = s[5], eps = s[6];
    /* torch's lerp(start, end, weight): start + weight * (end - start) for |weight| < 0.5, else
       end - (1 - weight) * (end - start) */
    const int from_end = fabsf(weight) >= 0.5f;
    const float weight_from_end = 1.0f - weight;
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float grad = (flags & GRAD_BF16) ? float_of_bits((uint32_t)g16[i] << 16) : g32[i];
        float param = (flags & PARAM_BF16) ? float_of_bits((uint32_t)p16[i] << 16) : p32[i];
        float diff = grad - m[i];
        float exp_avg = from_end ? grad - diff * weight_from_end : m[i] + weight * diff;
        float exp_avg_sq = v[i] * beta2 + grad * grad * one_minus_beta2;
        float denom = sqrtf(exp_avg_sq) / bias2_sqrt + eps;
        float value = param * decay - step_size * (exp_avg / denom);
        m[i] = exp_avg;
        v[i] = exp_avg_sq;
        if (!(flags & PARAM_BF16)) {
            p32[i] = value;
        } else if (flags & STOCHASTIC) {
            /* hashed_rounding_bits: the element's index and the key, 16 bits */
            uint32_t bits = mix32(((uint32_t)i * 0x9E3779B1u) ^ key) >> 16;
            p16[i] = bf16_stochastic(bits_of_float(value), bits);
        } else {
            p16[i] = bf16_nearest(bits_of_float(value));
        }
    }
}

static void step_chunk(const fgc_tensor *t, int64_t begin, int64_t end, const float *s) {
    int flags = (int)t->flags;
    if (!(flags & PARAM_BF16)) flags &= ~STOCHASTIC; /* fp32 weights are not rounded */
    switch (flags) {
    case 0: step_values(t, begin, end, s, 0); break;
    case GRAD_BF16: step_values(t, begin, end, s, GRAD_BF16); break;
    case PARAM_BF16: step_values(t, begin, end, s, PARAM_BF16); break;
    case PARAM_BF16 | GRAD_BF16: step_values(t, begin, end, s, PARAM_BF16 | GRAD_BF16); break;
    case PARAM_BF16 | STOCHASTIC: step_values(t, begin, end, s, PARAM_BF16 | STOCHASTIC); break;
    case PARAM_BF16 | GRAD_BF16 | STOCHASTIC: step_values(t, begin, end, s, PARAM_BF16 | GRAD_BF16 | STOCHASTIC); break;
    }
}

/* One AdamW step of COUNT tensors, SCALARS 7 a tensor (made for the step counts plus one):
   each step count plus one, the tensors' values in chunks of CHUNK shared among THREADS
   threads. 0, or -1 when memory ran out (nothing stepped). */
int fgc_adamw_step(const fgc_tensor *tensors, int64_t count, const float *scalars, int64_t threads) {
    int64_t *first = malloc((size_t)(count + 1) * sizeof *first); /* each tensor's first chunk */
    if (!first) return -1;
    first[0] = 0;
    for (int64_t k = 0; k < count; k++) {
        first[k + 1] = first[k] + (tensors[k].numel + CHUNK - 1) / CHUNK;
        *(float *)(intptr_t)tensors[k].step += 1.0f;
    }
    int64_t chunks = first[count];
#pragma omp parallel for schedule(static) num_threads((int)threads) if (threads > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t lo = 0, hi = count - 1; /* the last tensor whose first chunk is at most c */
        while (lo < hi) {
            int64_t mid = lo + (hi - lo + 1) / 2;
            if (first[mid] <= c) lo = mid; else hi = mid - 1;
        }
        int64_t begin = (c - first[lo]) * CHUNK;
        int64_t end = begin + CHUNK < tensors[lo].numel ? begin + CHUNK : tensors[lo].numel;
        step_chunk(&tensors[lo], begin, end, scalars + 7 * lo);
    }
    free(first);
    return 0;
}
"""

# flags that make the result exact (no contracted multiply-add, sqrt without errno) and a library
_REQUIRED = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
# tried in order: the first the compiler takes builds the library
_OPTIONAL = (
    ["-march=native", "-mprefer-vector-width=512", "-fopenmp"],
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    [],
)
_COMPILERS = ("cc", "gcc", "clang")

_lock = threading.Lock()
_built: Optional[tuple[Optional[ctypes.CDLL], str]] = None  # (the library or None, why not)


def library() -> tuple[Optional[ctypes.CDLL], str]:
    """The kernel's library, built on the first call of the process, and "" ; or None and why it
    did not build (no C compiler, or each compiler's last error)."""
    global _built
    with _lock:
        if _built is None:
            _built = _build()
        return _built


def _build() -> tuple[Optional[ctypes.CDLL], str]:
    compilers = [path for path in (shutil.which(name) for name in _COMPILERS) if path]
    if not compilers:
        return None, f"no C compiler found (looked for {', '.join(_COMPILERS)})"
    try:
        directory = tempfile.mkdtemp(prefix="fgc-adamw-")
    except OSError as error:
        return None, f"no temporary directory to build it in: {error}"
    source, shared = os.path.join(directory, "adamw.c"), os.path.join(directory, "adamw.so")
    errors = []
    try:
        with open(source, "w") as f:
            f.write(SOURCE)
        for compiler in dict.fromkeys(os.path.realpath(c) for c in compilers):
            for optional in _OPTIONAL:
                command = [compiler, *_REQUIRED, *optional, "-o", shared, source]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.TimeoutExpired) as error:
                    errors.append(f"{compiler}: {error}")
                    break
                if done.returncode == 0:
                    try:
                        lib = ctypes.CDLL(shared)
                    except OSError as error:  # e.g. a temporary directory mounted noexec
                        return None, f"{compiler} built it, but it did not load: {error}"
                    lib.fgc_adamw_step.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
                    lib.fgc_adamw_step.restype = ctypes.c_int
                    return lib, ""
            else:
                lines = done.stderr.strip().splitlines()
                errors.append(f"{compiler}: {lines[-1] if lines else 'exit status ' + str(done.returncode)}")
        return None, "; ".join(errors)
    except OSError as error:
        return None, f"could not write its source: {error}"
    finally:
        # the files this function wrote (a loaded library stays mapped), then its directory,
        # unless something else was left in it
        for path in (source, shared):
            if os.path.exists(path):
                os.remove(path)
        try:
            os.rmdir(directory)
        except OSError:
            pass


def supports(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: torch.Tensor) -> bool:
    """Whether the kernel steps these tensors (flat views of a weight and its state; its step
    count): plain contiguous CPU tensors (not DTensors or other subclasses), fp32 or bf16
    weights, fp32 states and step. (Its gradient: a plain contiguous tensor, fp32 or bf16, on
    the same device.)"""
    tensors = (param, exp_avg, exp_avg_sq, step)
    return (
        all(type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        and param.dtype in DTYPES
        and exp_avg.dtype == exp_avg_sq.dtype == step.dtype == torch.float32
        and step.numel() == 1
    )


def step(lib: ctypes.CDLL, tensors: Sequence[tuple], rows: Sequence[tuple], keys: Sequence[int]) -> None:
    """One step of TENSORS, each (weights, gradient, exp_avg, exp_avg_sq, step count, whether it
    is rounded stochastically), tensors that :func:`supports`, in place, on torch's number of
    threads: each step count plus one (in fp32, as ``torch._foreach_add_`` adds it), and the
    math of :func:`fgc_runtime.optim._fused_adamw_step` with its rows of scalars (fp64, 7 a
    tensor, made for the counts plus one) and its rounding keys (in [0, 2**32)). The tensors'
    version counters move as an in-place operation of torch's moves them."""
    table = array("q")
    for (param, grad, exp_avg, exp_avg_sq, count, stochastic), key in zip(tensors, keys):
        flags = (
            (PARAM_BF16 if param.dtype == torch.bfloat16 else 0)
            | (GRAD_BF16 if grad.dtype == torch.bfloat16 else 0)
            | (STOCHASTIC if stochastic else 0)
        )
        addresses = (param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), count.data_ptr())
        table.extend((*addresses, param.numel(), key, flags))
    # in fp32 as _fused_adamw_step converts them (to nearest)
    scalars = array("f", [value for row in rows for value in row])
    if lib.fgc_adamw_step(table.buffer_info()[0], len(tensors), scalars.buffer_info()[0], torch.get_num_threads()) != 0:
        raise MemoryError("fgc_runtime.cpu_adamw: out of memory")
    # written through their addresses: autograd is told, as it is of torch's in-place operations
    written = [t for param, _, exp_avg, exp_avg_sq, count, _ in tensors for t in (param, exp_avg, exp_avg_sq, count)]
    torch.autograd.graph.increment_version(written)
