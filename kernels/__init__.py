"""Triton kernels, importable as ``megavlm.kernels``.

Each kernel lives beside a plain-PyTorch reference and an autograd wrapper; model code never
imports from here directly, it is swapped in through ``megavlm.models.common.layer_specs``.
"""
