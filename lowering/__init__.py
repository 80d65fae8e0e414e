"""fgc's lowering passes (importable as ``fgc_lowering``): IR graph → checked, resolved, planned.

The whole pipeline is listed in :mod:`fgc_lowering.pipeline`.
"""
