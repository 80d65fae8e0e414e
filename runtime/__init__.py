"""fgc_runtime: the runtime vendored into every package fgc generates.

It imports only the Python standard library and torch, so a generated package runs with nothing
of fgc installed. Modules: ``errors``, ``distributed``, ``data``, ``train``, ``checkpoint``,
``metrics``, ``log``, ``sample``, ``optim``, ``control`` and ``kernels``.
"""
