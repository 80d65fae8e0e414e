"""The imports of the generated ``train.py``: from the names its text uses, not a hand-kept list.

The skeleton (``codegen_templates/train.py.j2``) is rendered, its free global names are read with
:mod:`symtable` (names a function or the module reads without binding them), and each one the
table below knows becomes an import. A name the rendered code does not use is not imported, so a
package imports exactly what it runs (and, through them, vendors only that part of the runtime).
"""

from __future__ import annotations

import symtable

# Where each name the skeleton may use comes from: (module, name), or (module, None) for
# ``import module``. The names of the config's own code (its optimizer and schedule targets)
# are imported by the emitter, not here.
SKELETON_NAMES: dict[str, tuple[str, str | None]] = {
    "argparse": ("argparse", None),
    "contextlib": ("contextlib", None),
    "tempfile": ("tempfile", None),
    "torch": ("torch", None),
    "Path": ("pathlib", "Path"),
    "DistributedDataParallel": ("torch.nn.parallel", "DistributedDataParallel"),
    **{m: ("fgc_runtime", m) for m in (
        "checkpoint", "control", "data", "distributed", "hf", "host_memory", "metrics", "pipeline", "quantize",
        "threads",
    )},
    "RunError": ("fgc_runtime.errors", "RunError"),
    "run_main": ("fgc_runtime.errors", "run_main"),
    "describe_groups": ("fgc_runtime.optim", "describe_groups"),
    "param_groups": ("fgc_runtime.optim", "param_groups"),
    "RankLog": ("fgc_runtime.log", "RankLog"),
    "format_plan": ("fgc_runtime.log", "format_plan"),
    **{n: ("fgc_runtime.train", n) for n in (
        "AuxLoss", "MFU", "Throughput", "autocast", "check_kernel_devices", "count_targets", "grad_norm",
        "loss_sum_and_count", "peak_memory_bytes", "set_seed", "whole_number",
    )},
    "layout": ("fgc_runtime.mesh", "layout"),
    **{n: ("fgc_runtime.parallel", n) for n in ("parallelize", "split_groups_by_mesh")},
    "step_sync": ("fgc_runtime.step", "step_sync"),
    "DiLoCo": ("fgc_runtime.diloco", "DiLoCo"),
    "DiLoCoState": ("fgc_runtime.diloco", "DiLoCoState"),
    "LMHeadLoss": ("fgc_runtime.kernels.cross_entropy", "LMHeadLoss"),
    "cross_entropy_sum_and_count": ("fgc_runtime.kernels.cross_entropy", "cross_entropy_sum_and_count"),
    "OptimizerInBackward": ("fgc_runtime.optim_in_backward", "OptimizerInBackward"),
    "TextSampler": ("fgc_runtime.sample", "TextSampler"),
    "load_tokenizer": ("fgc_runtime.sample", "load_tokenizer"),
    **{n: ("model", n) for n in ("TENSOR_RULES", "WEIGHTS_DIR", "build_model")},
}


def free_names(source: str) -> set[str]:
    """The global names SOURCE reads without binding them at module level (what imports must
    provide, or builtins)."""
    top = symtable.symtable(source, "train.py", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used: set[str] = set()

    def visit(table: symtable.SymbolTable) -> None:
        for sym in table.get_symbols():
            if sym.is_referenced() and (table is top or sym.is_global()):
                used.add(sym.get_name())
        for child in table.get_children():
            visit(child)

    visit(top)
    return used - bound


def skeleton_imports(source: str) -> list[str]:
    """The import lines for the skeleton names SOURCE uses: ``import M`` or one
    ``from M import a, b`` per module, names sorted."""
    by_module: dict[str, set[str]] = {}
    plain: set[str] = set()
    for name in free_names(source):
        if name not in SKELETON_NAMES:
            continue
        module, member = SKELETON_NAMES[name]
        if member is None:
            plain.add(module)
        else:
            by_module.setdefault(module, set()).add(member)
    return [f"import {m}" for m in sorted(plain)] + [
        f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(by_module.items())
    ]
