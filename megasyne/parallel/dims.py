"""The parallel layout of a run, validated before any process group exists.

torchtitan-style: one kw_only dataclass says how the world is split; everything
else (process groups, Megatron's TransformerConfig fields) is derived from it in
``megasyne.parallel.init``. Validation happens in ``__post_init__`` and in
``validate_for_model`` so a bad layout fails on every rank *before*
``init_process_group`` could leave some ranks waiting for others.
"""

from __future__ import annotations

from dataclasses import dataclass

from megasyne.errors import ConfigError


class ParallelConfigError(ConfigError):
    """A parallel layout that cannot work; the message says what to change."""


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    tp: int = 1
    """Tensor-parallel degree: attention heads and FFN columns split over this many ranks."""
    pp: int = 1
    """Pipeline-parallel degree: layers split into this many stages."""
    dp: int = -1
    """Data-parallel degree; -1 means world_size // (tp * pp * cp)."""
    cp: int = 1
    """Context-parallel degree (sequence split for attention); 1 on CPU."""
    world_size: int = 1
    """Number of ranks the job runs on (torchrun's WORLD_SIZE)."""
    virtual_pp: int | None = None
    """Interleaved pipeline: model chunks per pipeline rank (None = not interleaved)."""
    sequence_parallel: bool = False
    """Split LayerNorm/dropout activations over the TP group (needs tp > 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state (and fp32 master weights) over the data-parallel group (ZeRO-1)."""
    overlap_grad_reduce: bool = True
    """Reduce gradients over the data-parallel group bucket by bucket during the backward of the
    last micro-batch, as each bucket's last gradient is ready (all-reduce, or reduce-scatter
    with the distributed optimizer), instead of all at once after it. Same values either way
    (docs/design.md); off only to rule it out when debugging."""
    overlap_param_gather: bool | None = None
    """Distributed optimizer: all-gather the updated parameters bucket by bucket during the next
    forward (Megatron-Core's forward pre-hooks) instead of at the end of optimizer.step. None =
    on whenever distributed_optimizer and overlap_grad_reduce are (see ``param_gather_overlapped``);
    True requires both."""
    ddp_bucket_size: int | None = None
    """Parameters per gradient bucket when overlapping (smaller: the first reduce starts earlier,
    more collectives). None = Megatron-Core's max(40M, 1M x data-parallel size)."""

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
        model_parallel = self.tp * self.pp * self.cp
        if self.dp == -1:
            if self.world_size % model_parallel:
                raise ParallelConfigError(
                    f"world size {self.world_size} is not divisible by tp*pp*cp = "
                    f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}: change --nproc_per_node "
                    f"or the tp/pp/cp degrees"
                )
            object.__setattr__(self, "dp", self.world_size // model_parallel)
        elif self.dp < 1:
            raise ParallelConfigError(f"parallel.dp must be >= 1 or -1 (derived), got {self.dp}")
        if self.tp * self.pp * self.cp * self.dp != self.world_size:
            raise ParallelConfigError(
                f"tp*pp*cp*dp = {self.tp}*{self.pp}*{self.cp}*{self.dp} = "
                f"{self.tp * self.pp * self.cp * self.dp} but the world size is {self.world_size}: "
                f"the degrees must multiply to the number of ranks"
            )
        if self.virtual_pp is not None:
            if self.virtual_pp < 1:
                raise ParallelConfigError(f"parallel.virtual_pp must be >= 1, got {self.virtual_pp}")
            if self.pp < 2 and self.virtual_pp > 1:
                raise ParallelConfigError(
                    "parallel.virtual_pp (interleaved pipeline) needs pp >= 2; set virtual_pp=None"
                )
        if self.sequence_parallel and self.tp < 2:
            raise ParallelConfigError("sequence_parallel needs tp >= 2 (it splits activations over TP)")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ParallelConfigError(
                "parallel.overlap_param_gather needs distributed_optimizer=true (only the "
                "distributed optimizer all-gathers parameters); unset it or turn that on")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ParallelConfigError(
                "parallel.overlap_param_gather needs overlap_grad_reduce=true (the gather runs "
                "per gradient bucket, and without overlap there is one bucket); unset it")
        if self.ddp_bucket_size is not None and (
                isinstance(self.ddp_bucket_size, bool) or not isinstance(self.ddp_bucket_size, int)
                or self.ddp_bucket_size < 1):
            raise ParallelConfigError(f"parallel.ddp_bucket_size must be a positive number of "
                                      f"parameters or None, got {self.ddp_bucket_size!r}")

    @property
    def vp_size(self) -> int | None:
        """Megatron's virtual_pipeline_model_parallel_size (None when not interleaved)."""
        return self.virtual_pp if self.virtual_pp and self.virtual_pp > 1 else None

    @property
    def param_gather_overlapped(self) -> bool:
        """Whether parameter all-gathers overlap the next forward (``overlap_param_gather``
        resolved: None means on with the distributed optimizer and overlapped reduces)."""
        if self.overlap_param_gather is None:
            return self.distributed_optimizer and self.overlap_grad_reduce
        return self.overlap_param_gather

    @property
    def model_chunks(self) -> int:
        return self.vp_size or 1

    def layout_dict(self) -> dict:
        """The layout as checkpoints record it (what a resume compares, e.g. to restore
        per-rank RNG states only onto the same layout)."""
        return dict(tp=self.tp, pp=self.pp, dp=self.dp, virtual_pp=self.virtual_pp,
                    sequence_parallel=self.sequence_parallel,
                    distributed_optimizer=self.distributed_optimizer)

    def validate_for_model(self, *, num_layers: int, num_attention_heads: int,
                           num_query_groups: int, ffn_hidden_size: int,
                           micro_batches: int | None = None) -> None:
        """Checks that depend on the model's shape; raise with what to change."""
        # The hint lists only degrees that pass all three TP checks below.
        fits = [d for d in _divisors(num_attention_heads)
                if num_query_groups % d == 0 and ffn_hidden_size % d == 0]
        if num_attention_heads % self.tp:
            raise ParallelConfigError(
                f"{num_attention_heads} attention heads are not divisible by tp={self.tp}: "
                f"choose tp among {fits}"
            )
        if num_query_groups % self.tp:
            raise ParallelConfigError(
                f"{num_query_groups} KV (query) groups are not divisible by tp={self.tp}: "
                f"Megatron-Core splits whole GQA groups over TP, choose tp among {fits}"
            )
        if ffn_hidden_size % self.tp:
            raise ParallelConfigError(
                f"ffn_hidden_size {ffn_hidden_size} is not divisible by tp={self.tp}: "
                f"choose tp among {fits}"
            )
        stages = self.pp * self.model_chunks
        if num_layers % stages:
            raise ParallelConfigError(
                f"{num_layers} layers cannot be split evenly into pp*virtual_pp = {stages} "
                f"pipeline stages: choose pp/virtual_pp so that their product divides {num_layers}"
            )
        if self.vp_size and micro_batches is not None and micro_batches % self.pp:
            raise ParallelConfigError(
                f"the interleaved pipeline needs the number of micro-batches ({micro_batches}) "
                f"to be a multiple of pp={self.pp}"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
