"""Every place where megatron-core 0.16.1 assumes CUDA, neutralised for CPU runs.

One of the patches of ``megasyne.megatron_patches`` (applied with ``apply_cpu_shims()``; the
registry there lists every attribute changed here). ``install()`` is a no-op when CUDA is
available: on a GPU nothing is patched. Without CUDA (CI, laptops) each shim below fixes
one crash that a Megatron-Core code path we use would hit; the comment on each names the
crash. Keep the list short and keep it here.

How: the patched Megatron modules get a stand-in for their module-level ``torch``
name (``_TorchOnCpu``) that maps ``device="cuda"`` to the CPU in tensor factories
and answers ``torch.cuda.current_device()`` / ``synchronize()`` / RNG calls with CPU
equivalents; everything else is forwarded to the real torch. Only the modules
listed in ``MODULES_WITH_CUDA_DEVICES`` see it, so user code is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

_INSTALLED = False
_CUDA_DEVICE_NAMES = ("cuda",)
# Where "cuda" goes: the CPU, or the meta device inside `cuda_maps_to("meta")` (a dry run that
# builds and runs a rank's model without allocating it, see megasyne.planning).
_TARGET = [torch.device("cpu")]


@contextlib.contextmanager
def cuda_maps_to(device):
    """Inside the block, the patched modules' "cuda" is ``device`` (e.g. ``"meta"``)."""
    old = _TARGET[0]
    _TARGET[0] = torch.device(device)
    try:
        yield
    finally:
        _TARGET[0] = old


def _cpu_device(device):
    """Map 'cuda', 'cuda:N', torch.device('cuda') and bare ints (CUDA ordinals) to CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return _TARGET[0]
    dev = torch.device(device)
    return _TARGET[0] if dev.type in _CUDA_DEVICE_NAMES else dev


class _CudaOnCpu:
    """What ``torch.cuda`` looks like to a patched Megatron module on a CPU-only machine."""

    @staticmethod
    def current_device():
        # Used as `device=torch.cuda.current_device()` and `.to(torch.cuda.current_device())`.
        return _TARGET[0]

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None  # CPU ops are synchronous.

    @staticmethod
    def is_available():
        return False

    # RNG: on CPU the "CUDA" generator of Megatron's tracker is the CPU generator.
    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _with_cpu_device(factory):
    @functools.wraps(factory)
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapped


class _TorchOnCpu(types.ModuleType):
    """A ``torch`` whose tensor factories send ``device='cuda'`` to the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand",
                  "zeros_like", "ones_like", "empty_like", "as_tensor")

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in self._FACTORIES:
            setattr(self, name, _with_cpu_device(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


# Shim 1+2. Modules with hard-coded CUDA devices or CUDA RNG calls on paths we use:
# - tensor_parallel.random: `model_parallel_cuda_manual_seed` -> `CudaRNGStatesTracker.add`
#   calls torch.cuda.get_rng_state() -> "Torch not compiled with CUDA enabled".
# - pipeline_parallel.schedules: `torch.zeros([], device="cuda")` for the token count
#   of every forward_backward call -> same error.
# - pipeline_parallel.p2p_communication: shapes and buffers on torch.cuda.current_device().
# - models.common.embeddings.rotary_pos_embedding: `inv_freq.to(torch.cuda.current_device())`.
# - optimizer.clip_grads / optimizer.optimizer / optimizer.distrib_optimizer:
#   `torch.zeros(..., device='cuda')` for the grad-norm all-reduce and overflow buffers.
# - distributed.param_and_grad_buffer / distributed_data_parallel: bucket buffers on
#   torch.cuda.current_device().
# - transformer.utils: `get_default_causal_mask` builds the causal mask with
#   torch.ones(sq, sq, device="cuda") whenever no explicit attention mask is passed.
# - dist_checkpointing.strategies.filesystem_async: `preload_tensors` calls
#   torch.cuda.synchronize() before every checkpoint write; state_dict_saver's
#   `save_state_dict_async_finalize` all-reduces a failure flag on
#   torch.cuda.current_device(); exchange_utils exchanges shard metadata on CUDA tensors.
# - tensor_parallel.layers / mappings / data / utils, transformer.module, utils:
#   buffers and broadcasts placed on torch.cuda.current_device().
MODULES_WITH_CUDA_DEVICES = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)


@contextlib.contextmanager
def _cpu_tensors_report_cuda_type():
    """While active, ``Tensor.type()`` names CPU float tensors like their CUDA twins."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """While active, ``Tensor.cuda()`` returns the CPU tensor itself."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _wrap_in(owner, attr, context):
    """Run ``owner.attr`` (function, method, staticmethod or classmethod) inside ``context()``;
    idempotent."""
    raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    fn = raw.__func__ if kind else raw
    if getattr(fn, "_megasyne_shim", False):
        return

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    wrapped._megasyne_shim = True
    setattr(owner, attr, kind(wrapped) if kind else wrapped)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _DropSpuriousRngWarning(logging.Filter):
    # Shim 5. CudaRNGStatesTracker.fork warns "CPU RNG state changed within GPU RNG context"
    # whenever the forked generator is used; on CPU the forked "GPU" generator IS the CPU
    # generator, so the warning fires on every fork and means nothing.
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def shims_needed() -> bool:
    return not torch.cuda.is_available()


def install() -> bool:
    """Install the CPU shims once; returns True when they are active (no CUDA)."""
    global _INSTALLED
    if not shims_needed():
        return False
    if _INSTALLED:
        return True
    torch_on_cpu = _TorchOnCpu()
    for name in MODULES_WITH_CUDA_DEVICES:
        module = importlib.import_module(name)
        module.torch = torch_on_cpu

    # Shim 2b. CudaRNGStatesTracker.fork (entered by DotProductAttention and the embedding
    # on every forward) reads/writes the generator through these two helpers, which call
    # torch.cuda.random.get_rng_state / torch.cuda's lazy init directly: "Torch not compiled
    # with CUDA enabled". On CPU the tracked generator is the CPU generator.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state

    # Shim 3. optimizer.clip_grads.clip_grad_by_total_norm_fp32 asserts
    # `param.grad.type() == 'torch.cuda.FloatTensor'` (CPU grads are 'torch.FloatTensor').
    # Shim 4. Float16OptimizerWithFloat16Params.__init__ and the distributed optimizer's
    # param-group builder raise "Wrapped parameters must be one of torch.cuda.FloatTensor,
    # torch.cuda.HalfTensor, or torch.cuda.BFloat16Tensor" for CPU parameters.
    # Only while those functions run, Tensor.type() reports CPU tensors with CUDA names.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    cuda_names = _cpu_tensors_report_cuda_type
    _wrap_in(clip_grads, "clip_grad_by_total_norm_fp32", cuda_names)
    _wrap_in(optimizer.Float16OptimizerWithFloat16Params, "__init__", cuda_names)
    _wrap_in(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups",
             cuda_names)
    # clip_grads binds the function by name in optimizer.py: rebind the patched one.
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32

    # Shim 6. With tied embeddings at PP > 1, LanguageModule.setup_embeddings_and_output_layer
    # copies the shared weight between first and last stage with `weight.data.cuda()`
    # (language_module.py:244) -> "Torch not compiled with CUDA enabled" while building the
    # model. Only during that method, Tensor.cuda() leaves CPU tensors where they are.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _wrap_in(LanguageModule, "setup_embeddings_and_output_layer", _tensor_cuda_is_identity)

    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropSpuriousRngWarning())
    _INSTALLED = True
    return True


def installed() -> bool:
    return _INSTALLED
