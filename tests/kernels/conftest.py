"""Kernel tests run the Triton kernels under the interpreter on CPU.

TRITON_INTERPRET is read when a @triton.jit function is decorated, so it must be set before
triton (or megatron, which imports triton) is first imported in this process.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
