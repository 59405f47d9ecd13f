"""Build Megatron-Core GPTModel chunks for a Llama config on the current rank.

The model itself holds no parallel code: the parallel degrees come from a
``ParallelDims`` and are only copied into Megatron's ``TransformerConfig`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megasyne import megatron_patches
from megasyne.errors import ConfigError
from megasyne.model import accel, fusions
from megasyne.model.config import LlamaConfig
from megasyne.model.norm import RMSNorm
from megasyne.model.rope import set_rope_frequencies
from megasyne.parallel.dims import ParallelDims


@dataclass(kw_only=True, frozen=True)
class ModelRuntime:
    """How to run the model on this machine (not part of the architecture)."""

    dtype: torch.dtype = torch.float32
    """Parameter / compute dtype: torch.float32 or torch.bfloat16 (fp32 master weights live in the optimizer)."""
    triton_kernels: bool | None = None
    """Our Triton kernels (RMSNorm, cross-entropy, RoPE, SwiGLU); None = on with CUDA
    (MEGASYNE_KERNELS=0 turns them off)."""
    recompute: str | None = None
    """Activation recomputation: None, "selective" (attention core) or "full" (whole layers)."""
    use_te: bool | None = None
    """Transformer-Engine layer spec; None = when CUDA is present and TE imports cleanly."""
    attention: str | None = None
    """Core attention for the local spec: "sdpa" (torch flash/mem-efficient) or "megatron"
    (DotProductAttention, materialises scores); None = sdpa on CUDA, megatron on CPU."""
    wgrad_fusion: bool | None = None
    """Weight gradients accumulated in fp32 inside the GEMM (Megatron's gradient-accumulation
    fusion; needs Megatron DDP's main_grad, which the trainer always has). None = on with
    CUDA (apex's, TE's, or ours when its probe passes); True = force ours (also on CPU, for
    tests); False = off."""
    init_weights: bool = True
    """Random-initialise weights (False when they will be loaded, or to build on the meta device)."""

    def __post_init__(self):
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"runtime.dtype must be float32, bfloat16 or float16, "
                              f"got {self.dtype}")
        if self.recompute not in (None, "selective", "full"):
            raise ConfigError(f"runtime.recompute must be None, 'selective' or 'full', "
                              f"got {self.recompute!r}")
        if self.attention not in (None, "sdpa", "megatron"):
            raise ConfigError(f"runtime.attention must be None, 'sdpa' or 'megatron', "
                              f"got {self.attention!r}")
        if self.use_te and not accel.transformer_engine_available():
            raise ConfigError("runtime.use_te=True but transformer_engine does not import "
                              "cleanly here: install it (pip install .[gpu]) or leave use_te unset")

    @property
    def kernels_on(self) -> bool:
        return accel.triton_kernels_default() if self.triton_kernels is None else self.triton_kernels

    @property
    def attention_backend(self) -> str:
        return self.attention or ("sdpa" if torch.cuda.is_available() else "megatron")

    @property
    def te_on(self) -> bool:
        return accel.transformer_engine_available() if self.use_te is None else self.use_te


def transformer_config(cfg: LlamaConfig, dims: ParallelDims, runtime: ModelRuntime = ModelRuntime()):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dims.validate_for_model(num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                            num_query_groups=cfg.num_query_groups, ffn_hidden_size=cfg.ffn_hidden_size)
    cuda = torch.cuda.is_available()
    # Our fused RoPE / SwiGLU ride on Megatron-Core's own hooks (megasyne/model/fusions.py;
    # the RoPE slot is filled by megasyne.megatron_patches); TE's spec brings its own fusions.
    ours = runtime.kernels_on and not runtime.te_on
    rope_fusion = runtime.te_on or (ours and megatron_patches.apply_rope_slot())
    recompute = {}
    if runtime.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif runtime.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    return TransformerConfig(
        # architecture
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,          # SwiGLU: linear_fc1 = [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        attention_softmax_in_fp32=True,
        # parallelism (copied from the validated layout)
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vp_size,
        context_parallel_size=dims.cp,
        sequence_parallel=dims.sequence_parallel,
        pipeline_dtype=runtime.dtype,
        # Interleaved PP2: a rank sends to and receives from the same peer in both directions
        # in one step; batched isend/irecv then pairs messages by order per peer and mixes
        # activations with gradients (seen on gloo: loss off by 1e-2). The unbatched path
        # uses a separate communicator per direction when the pipeline group has 2 ranks.
        batch_p2p_comm=dims.vp_size is None,
        # precision
        params_dtype=runtime.dtype,
        bf16=runtime.dtype == torch.bfloat16,
        fp16=runtime.dtype == torch.float16,
        # fusions: only what this machine can run (apex/TE are optional)
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=rope_fusion,
        use_te_activation_func=ours,     # = call the spec's activation module (our SwiGLU)
        gradient_accumulation_fusion=_wgrad_fusion(runtime, cuda),
        use_cpu_initialization=not cuda,
        perform_initialization=runtime.init_weights,
        **recompute,
    )


def _wgrad_fusion(runtime: ModelRuntime, cuda: bool) -> bool:
    if runtime.wgrad_fusion is False:
        return False
    if runtime.wgrad_fusion:
        return megatron_patches.apply_wgrad_accumulation(force=True)
    # apply_wgrad_accumulation() keeps apex's extension when Megatron-Core imported it.
    return cuda and (runtime.te_on or megatron_patches.apply_wgrad_accumulation())


def layer_spec(cfg: LlamaConfig, config, runtime: ModelRuntime, vp_stage: int | None = None):
    """Transformer-Engine spec when available, else the local spec with our RMSNorm."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if runtime.te_on:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    norm = ModuleSpec(module=RMSNorm, params={"use_kernel": runtime.kernels_on})
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    if runtime.kernels_on:  # read by MLP because transformer_config set use_te_activation_func
        spec.submodules.mlp.submodules.activation_func = fusions.SwiGLU
        from megasyne.model.layer import FusedResidualNormLayer

        spec.module = FusedResidualNormLayer  # attention residual add + pre-MLP norm: one kernel
    if runtime.attention_backend == "sdpa":
        from megasyne.model.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=norm,
    )


def build_model(cfg: LlamaConfig, dims: ParallelDims, runtime: ModelRuntime = ModelRuntime()):
    """This rank's model chunks (one per virtual pipeline stage), after ``init_parallel``."""
    from megatron.core import parallel_state

    from megasyne.model.llama import LlamaGPTModel

    config = transformer_config(cfg, dims, runtime)
    chunks = []
    for vp_stage in range(dims.model_chunks):
        stage = vp_stage if dims.vp_size else None
        model = LlamaGPTModel(
            config=config,
            transformer_layer_spec=layer_spec(cfg, config, runtime, stage),
            vocab_size=cfg.padded_vocab_size(dims.tp),
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
            # Megatron's own scaling hard-codes Llama-3.1's constants but the factor:
            # the scaled frequencies are ours, set just below.
            rope_scaling=False,
            vp_stage=stage,
            use_triton_cross_entropy=runtime.kernels_on,
            real_vocab_size=cfg.vocab_size,
            # Packed documents (megasyne.model.documents): PackedSeqParams for the core
            # attentions that take them (TE's, our SDPA), a block-diagonal mask for Megatron's.
            document_attention="thd" if runtime.te_on or runtime.attention_backend == "sdpa"
            else "mask",
        )
        model.llama_config = cfg
        set_rope_frequencies(model, cfg)
        if not runtime.init_weights:
            _mark_tensor_parallel_params(model)
        chunks.append(model)
    return chunks


def _mark_tensor_parallel_params(model) -> None:
    """Set Megatron's TP attributes that only its weight *initialisation* sets.

    With ``perform_initialization=False`` (weights to be loaded) megatron-core 0.16.1
    leaves ``tensor_model_parallel``/``partition_dim`` unset on Column/RowParallelLinear
    and VocabParallelEmbedding weights; the optimizer's grad-norm would then count every
    TP shard as a duplicate and our TP slicing would not know how to cut them.
    """
    from megatron.core.tensor_parallel import layers

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if isinstance(module, (layers.ColumnParallelLinear, layers.VocabParallelEmbedding)):
            layers.set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif isinstance(module, layers.RowParallelLinear):
            layers.set_tensor_model_parallel_attributes(weight, True, 1, 1)
