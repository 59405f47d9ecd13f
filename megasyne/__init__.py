"""megasyne: continual pre-training of Llama-3 on Megatron-Core (Llama-3-SynE recipe)."""

import os as _os

# megatron-core imports triton at import time and decorates @triton.jit functions then.
# Without a GPU, triton has "0 active drivers" and only its interpreter works; the mode is
# read when a function is decorated, so it must be set before megatron (or our kernels) load.
# On a GPU machine this is a no-op.
if "TRITON_INTERPRET" not in _os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            _os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

__version__ = "0.1.0"
