"""fgc_runtime's Triton kernels, each with a torch twin in ``fgc_runtime.kernels`` it is tested
against (forward and backward).

Imported only when a kernel is called with ``impl="triton"``: a package that never asks for
them needs neither triton nor a GPU. Modules: ``rms_norm``, ``swiglu``, ``rope``,
``cross_entropy`` (the LM head and its loss, twin of ``fused_linear_cross_entropy(impl="torch")``).
"""
