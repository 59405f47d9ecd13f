"""Run configuration: a named preset or YAML file plus a few ``key=value`` overrides.

Every value is validated here, on every rank, before any process group starts. The
resolved configuration is written to ``<run_dir>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from megasyne.atomic import atomic_write_text
from megasyne.errors import ConfigError  # (also imported from here by the trainer)
from megasyne.model.config import LlamaConfig
from megasyne.model.presets import get_preset
from megasyne.parallel.dims import ParallelConfigError, ParallelDims
from megasyne.training.documents import DocumentMasking
from megasyne.training.optim import OptimConfig
from megasyne.training.schedule import ScheduleConfig

if TYPE_CHECKING:  # imported lazily at parse time (they pull in the eval / syne packages)
    from megasyne.training.hooks.adaptive_mixture import AdaptiveTrainConfig
    from megasyne.training.hooks.bench_probe import BenchEvalConfig


@dataclass(kw_only=True, frozen=True)
class StageSettings:
    """Per-stage LR: inside the named recipe stage, the schedule restarts over that stage's
    steps with this peak/min LR (e.g. SynE stage II re-warms and decays on its own)."""

    lr: float
    """Peak LR of the stage."""
    min_lr: float = 0.0
    """Floor of the stage's decay."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Shape of the stage's schedule, over the stage's own steps."""

    def __post_init__(self):
        for key in ("lr", "min_lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr} "
                             f"min_lr={self.min_lr}")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    run_dir: str
    """Where config.yaml, metrics.jsonl, checkpoints/ and the mixture index go."""
    recipe: str
    """Mixture/curriculum recipe YAML (megasyne.data.recipe); its seq_length is the run's."""
    model: str = "tiny_debug"
    """Model preset name (megasyne.model.presets), or "init_checkpoint": the architecture
    recorded in init_checkpoint's manifest (e.g. what convert_hf.py read from config.json)."""
    model_overrides: dict = field(default_factory=dict)
    """Fields of the preset to change (e.g. vocab_size to match the tokenizer)."""
    init_checkpoint: str | None = None
    """megasyne checkpoint to start from (e.g. converted from HF); None = random init."""
    parallel: ParallelDims = field(default_factory=ParallelDims)
    """The parallel layout (megasyne.parallel.ParallelDims); its world_size is the launcher's
    (torchrun's WORLD_SIZE) unless the config names one (a rehearsal of a bigger run)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    document_masking: DocumentMasking = field(default_factory=DocumentMasking)
    """Attention, positions and loss kept inside each document of a packed sample
    (megasyne.training.documents: enabled, eod_mask_loss); off by default."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    train_steps: int | None = None
    """Optimizer steps; None = as many as the recipe's samples fill."""
    dtype: str = "fp32"
    """"fp32" or "bf16" (bf16 params/compute with fp32 master weights and grads)."""
    recompute: str | None = None
    """Activation recomputation: None, "selective" or "full"."""
    triton_kernels: bool | None = None
    """Our Triton kernels; None = on with CUDA."""
    seed: int = 1234
    """Model-init and dropout seed (data order is the recipe's seed)."""
    log_interval: int = 1
    """Console line every N steps (metrics.jsonl gets every step)."""
    exit_at_step: int | None = None
    """Checkpoint and stop after this step (like Megatron's --exit-interval); rerun to resume."""
    save_interval: int | None = None
    """Checkpoint every N steps (and at the end, and on SIGTERM)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted after a successful save)."""
    async_save: bool = False
    """Write checkpoints in the background (megasyne.checkpoint.async_save): a save blocks
    training only while the state is snapshotted to host memory. The checkpoint becomes
    ``latest`` once every rank has written it and its checksums are recorded: checked
    without waiting after every step, waited for before the next save, at the end of the
    run, at exit_at_step and SIGTERM stops, and before a resume. A crash meanwhile leaves
    the previous checkpoint as the latest; a failed write (full disk) is reported, as a
    CheckpointError naming the checkpoint, at the step where it is found."""
    eval_interval: int | None = None
    """Validation every N steps on eval_recipe (per-source loss and perplexity)."""
    eval_recipe: str | None = None
    """Held-out data recipe for validation."""
    eval_samples: int = 16
    """Validation sequences per evaluation (over all DP ranks)."""
    max_nonfinite_in_a_row: int = 3
    """Abort after this many consecutive steps with a NaN/inf loss (each is skipped)."""
    tensorboard: bool = True
    """Write TensorBoard events to run_dir/tensorboard when the package is installed."""
    data_prefetch: int = 2
    """Steps whose micro-batches are read ahead on a background thread (in pinned memory on
    CUDA) while the current step computes (megasyne.training.prefetch); 0 = each step reads
    its batch itself, before computing. The data of every step is the same either way; a
    step's wait for its data is logged as data_wait_ms. Memory: this many steps' batches of
    one rank (tokens, labels, masks; ~20 bytes per token)."""
    fault_nan_steps: tuple = ()
    """Testing hook: steps whose loss is replaced by NaN (to exercise the skip path)."""
    fault_slow_async_write: tuple = ()
    """Testing hook: steps whose background checkpoint write first sleeps 300 s (to kill a
    run while that write is pending); needs async_save."""
    fault_data_read_delay_s: float = 0.0
    """Testing hook: seconds every step's data read sleeps (slow storage), on the prefetch
    thread when data_prefetch > 0."""
    fault_step_delay_s: float = 0.0
    """Testing hook: seconds added to every step's compute (a stand-in for a GPU step's
    length on the tiny CPU model), to measure how reads overlap with it."""
    stop_after_stage: str | None = None
    """Checkpoint and stop when this recipe stage is done (e.g. run SynE stage I alone;
    a later run with the same run_dir and no stop continues into the next stage)."""
    stage_settings: dict = field(default_factory=dict)
    """Recipe stage name -> StageSettings (its own LR and schedule inside that stage)."""
    adaptive: AdaptiveTrainConfig | None = None
    """Adaptive topic mixture (megasyne.training.hooks.adaptive_mixture): one group of topics
    or several (``groups``, e.g. per language); needs eval_recipe."""
    bench_eval: BenchEvalConfig | None = None
    """Benchmark accuracy during training (megasyne.training.bench_eval): a fixed
    multiple-choice subset scored every interval_steps (any TP/PP/DP, no virtual stages)."""
    fresh_start: bool = False
    """Start from step 0 although run_dir holds checkpoints: they and metrics.jsonl are moved
    aside (renamed ``*.set-aside-<time>``, never deleted). A one-launch request: accepted only
    as a command-line override, since a relaunch of the same config would start over again."""
    rebase_data: bool = False
    """On resume, when the recipe or a source's data changed since the checkpoint: continue
    every source from its saved stream position under the new recipe (instead of refusing).
    See megasyne.training.data_state."""
    fault_topic_ppl_growth: dict = field(default_factory=dict)
    """Testing hook: topic -> rate at which its measured validation perplexity is made to grow
    per adaptive interval (to exercise the adaptive mixture on a tiny model)."""

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("micro_batch_size and global_batch_size must be >= 1")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.train_steps is not None and self.train_steps < 1:
            raise ConfigError(f"train_steps must be >= 1, got {self.train_steps}")
        if isinstance(self.data_prefetch, bool) or not isinstance(self.data_prefetch, int) \
                or self.data_prefetch < 0:
            raise ConfigError(f"data_prefetch must be an integer >= 0 (steps read ahead; 0 = "
                              f"off), got {self.data_prefetch!r}")
        for key in ("fault_data_read_delay_s", "fault_step_delay_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key} must be a number of seconds >= 0, got {value!r}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError("save_interval must be >= 1")
        if not isinstance(self.async_save, bool):
            raise ConfigError(f"async_save must be true or false, got {self.async_save!r}")
        if self.fault_slow_async_write and not self.async_save:
            raise ConfigError("fault_slow_async_write delays background checkpoint writes: it "
                              "needs async_save=true")
        if self.eval_interval is not None and not self.eval_recipe:
            raise ConfigError("eval_interval is set but eval_recipe is not")
        if not Path(self.recipe).is_file():
            raise ConfigError(f"recipe: file not found: {self.recipe}")
        if self.eval_recipe and not Path(self.eval_recipe).is_file():
            raise ConfigError(f"eval_recipe: file not found: {self.eval_recipe}")
        if self.adaptive is not None and not self.eval_recipe:
            raise ConfigError("adaptive needs eval_recipe: the topics' validation perplexity "
                              "drives the mixture")
        for name, st in self.stage_settings.items():
            if not isinstance(st, StageSettings):
                raise ConfigError(f"stage_settings.{name} must be a StageSettings")
        if self.document_masking.enabled and self.parallel.cp > 1:
            raise ConfigError("document_masking.enabled does not support context parallelism "
                              "(parallel.cp > 1): use cp=1")
        if self.init_checkpoint and not Path(self.init_checkpoint).exists():
            raise ConfigError(f"init_checkpoint: not found: {self.init_checkpoint}")
        model = self.model_config()  # validates the preset and overrides
        try:  # the layout against the model, once, before any process group exists
            self.parallel.validate_for_model(
                num_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
                num_query_groups=model.num_query_groups, ffn_hidden_size=model.ffn_hidden_size,
                micro_batches=self.num_microbatches(self.parallel.dp))
        except ParallelConfigError as exc:
            raise ConfigError(f"parallel: {exc}") from None

    def model_config(self) -> LlamaConfig:
        if self.model == "init_checkpoint":
            if not self.init_checkpoint:
                raise ConfigError("model: init_checkpoint needs init_checkpoint to be set")
            from megasyne.checkpoint.dist import read_manifest, resolve

            try:
                saved = dict(read_manifest(resolve(self.init_checkpoint))["model"])
                saved.update(self.model_overrides)
                return LlamaConfig.from_dict(saved)
            except (OSError, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"model from init_checkpoint {self.init_checkpoint}: {exc}") from None
        try:
            return get_preset(self.model, **self.model_overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model {self.model!r} with overrides {self.model_overrides}: {exc}") from None

    def num_microbatches(self, dp: int) -> int:
        per_rank = self.global_batch_size // dp
        if self.global_batch_size % dp or per_rank % self.micro_batch_size:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} must be a multiple of "
                f"micro_batch_size {self.micro_batch_size} x data-parallel size {dp}"
            )
        return per_rank // self.micro_batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _NumberAwareLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-5 / 3E4 as floats (YAML 1.2 behaviour)."""


_NumberAwareLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_SECTIONS = {"parallel": ParallelDims, "optim": OptimConfig, "schedule": ScheduleConfig,
             "document_masking": DocumentMasking}


def _parse_value(text: str):
    # YAML 1.1 reads "1e-5" as a string (it wants "1.0e-5"): try numbers first.
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.load(text, Loader=_NumberAwareLoader)  # {lr: 1e-5} inside a mapping too


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b=value`` strings applied onto a nested dict (values parsed as YAML)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def _section(name: str, cls, section, *, hint: str = "", fixed: dict | None = None):
    """``cls(**section)`` for the config section ``name``, errors naming the key."""
    if not isinstance(section, dict):
        raise ConfigError(f"{name} must be a mapping{hint}")
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(section) - fields)
    if bad:
        raise ConfigError(f"unknown keys in {name}: {bad}; known: {sorted(fields)}")
    try:
        return cls(**{**(fixed or {}), **section})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _absolute(path: str, base_dir) -> str:
    return path if os.path.isabs(path) else str((Path(base_dir) / path).resolve())


def from_dict(raw: dict, *, base_dir: str | os.PathLike = ".") -> TrainConfig:
    """Build and validate a TrainConfig; unknown keys are errors that name them."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {unknown}; known: {sorted(known)}")
    kwargs = dict(raw)
    for name, cls in _SECTIONS.items():
        # The parallel layout is checked against the launcher's world size unless the
        # config names one (e.g. to rehearse a bigger run).
        fixed = {"world_size": _launcher_world_size()} if cls is ParallelDims else None
        kwargs[name] = _section(name, cls, kwargs.get(name) or {}, fixed=fixed)
    for key in ("recipe", "eval_recipe", "init_checkpoint", "run_dir"):
        if kwargs.get(key):
            kwargs[key] = _absolute(kwargs[key], base_dir)
    stages = kwargs.get("stage_settings") or {}
    if not isinstance(stages, dict):
        raise ConfigError("stage_settings must map recipe stage names to {lr, min_lr, schedule}")
    kwargs["stage_settings"] = {}
    for name, st in stages.items():
        st = dict(st or {})
        if isinstance(st.get("schedule"), dict):
            st["schedule"] = _section(f"stage_settings.{name}.schedule", ScheduleConfig,
                                      st["schedule"])
        kwargs["stage_settings"][name] = _section(f"stage_settings.{name}", StageSettings, st)
    if kwargs.get("adaptive") is not None:
        from megasyne.training.hooks.adaptive_mixture import AdaptiveTrainConfig

        kwargs["adaptive"] = _section("adaptive", AdaptiveTrainConfig, kwargs["adaptive"],
                                      hint=" (topics or groups, interval_steps, alpha, ...)")
    if kwargs.get("bench_eval") is not None:
        from megasyne.training.hooks.bench_probe import BenchEvalConfig

        section = kwargs["bench_eval"]
        if isinstance(section, dict):
            section = {k: (_absolute(v, base_dir) if k in ("tasks", "tokenizer") and v else v)
                       for k, v in section.items()}
        kwargs["bench_eval"] = _section("bench_eval", BenchEvalConfig, section,
                                        hint=" (tasks, tokenizer, interval_steps, ...)")
    for name in ("fault_nan_steps", "fault_slow_async_write"):
        if name in kwargs:
            kwargs[name] = tuple(kwargs[name] or ())
    try:
        return TrainConfig(**kwargs)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _launcher_world_size() -> int:
    from megasyne.parallel.init import launcher_world

    return launcher_world()[2]


def load_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(p.read_text(), Loader=_NumberAwareLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if isinstance(raw, dict) and raw.get("fresh_start"):
        raise ConfigError(f"{path}: fresh_start belongs on the command line of one launch "
                          f"(--set fresh_start=true), not in a config file: every relaunch of "
                          f"this config would set the run's checkpoints aside and start over")
    raw = apply_overrides(raw, list(overrides))
    return from_dict(raw, base_dir=p.parent)


def dump_config(cfg: TrainConfig, path: Path) -> None:
    data = cfg.to_dict()
    data["fault_nan_steps"] = list(data["fault_nan_steps"])
    data["fault_slow_async_write"] = list(data["fault_slow_async_write"])
    data["fresh_start"] = False  # done by this launch; the record must not repeat it
    if data.get("adaptive") and data["adaptive"].get("topics") is not None:
        data["adaptive"]["topics"] = list(data["adaptive"]["topics"])
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
