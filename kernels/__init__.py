"""Triton kernels of megasyne, installed as ``megasyne.kernels``.

Each kernel module imports only torch and triton, so it can be used and tested alone.
"""
