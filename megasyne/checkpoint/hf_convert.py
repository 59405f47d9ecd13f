"""Convert Hugging Face Llama directories to megasyne checkpoints and back.

HF -> megasyne writes exactly what ``megasyne.checkpoint.dist.save_checkpoint`` writes
(iteration 0, model only, ``extra.source == "hf"``), loadable at any TP/PP:

- one process (the default): the model is built on the meta device, so Megatron supplies
  the checkpoint's structure (keys, stacked layer shapes, GLU split, _extra_state objects)
  without memory; a DCP planner then asks for each chunk's bytes while the file is being
  written, converting one HF tensor at a time (peak ~ the largest tensor, the embedding);
- a TP x PP layout under torchrun: every rank builds its real shard, fills it from the HF
  files and saves with ``save_checkpoint`` (peak per rank ~ its shard + one full tensor).

megasyne -> HF needs neither Megatron nor a process group: parameters are read out of the
dist checkpoint one layer at a time and streamed into safetensors shards.

Every input check happens before the first byte is written, and outputs appear atomically
(written under ``.<name>.partial`` next to the target, then renamed); ``--overwrite`` replaces
only what the converter writes, and an output overlapping an input is refused (see
megasyne.checkpoint.convert_output).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megasyne.checkpoint.convert_output import (
    CHECKPOINT_MARKER,
    HF_MARKER,
    check_output,
    owned_by_checkpoint_export,
    owned_by_hf_export,
    partial_dir,
    publish,
)
from megasyne.checkpoint.hf import (
    TOKENIZER_FILES,
    HFCheckpoint,
    HFConversionError,
    SafetensorsStreamWriter,
    dist_key,
    dtype_name,
    full_name,
    hf_config_from_llama,
    hf_shapes,
    llama_config_from_hf,
    param_maps,
    parse_size,
    plan_shards,
    to_hf,
    to_megatron,
    validate_hf,
)
from megasyne.model.config import LlamaConfig, ModelConfigError
from megasyne.parallel.dims import ParallelDims


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _publish_checkpoint(partial: Path, output: Path) -> None:
    publish(partial, output, marker=CHECKPOINT_MARKER, owns=owned_by_checkpoint_export)


# --------------------------------------------------------------------------- HF -> megasyne

def inspect_hf(hf_dir, *, tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None):
    """Read and check an HF directory against a layout: (HFCheckpoint, LlamaConfig, dtype).

    Cheap (file headers only) and Megatron-free, so bad input fails in a second.
    """
    ckpt = HFCheckpoint(hf_dir)
    cfg = llama_config_from_hf(ckpt.config, name=Path(hf_dir).resolve().name)
    source_dtype = validate_hf(ckpt, cfg)
    dims = ParallelDims(tp=tp, pp=pp, world_size=tp * pp)
    dims.validate_for_model(num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                            num_query_groups=cfg.num_query_groups,
                            ffn_hidden_size=cfg.ffn_hidden_size)
    return ckpt, cfg, dtype or source_dtype


class MegatronFromHF:
    """Full (TP1-layout) Megatron parameters made on demand from the HF files."""

    def __init__(self, ckpt: HFCheckpoint, cfg: LlamaConfig, padded_vocab: int, dtype: torch.dtype):
        self.ckpt, self.cfg, self.padded_vocab, self.dtype = ckpt, cfg, padded_vocab, dtype
        self.maps = {pm.megatron: pm for pm in param_maps(cfg)}
        if cfg.tie_word_embeddings:  # PP's last stage holds a copy of the embedding
            self.maps["output_layer.weight"] = self.maps["embedding.word_embeddings.weight"]
        self._last: tuple[str, torch.Tensor] | None = None

    def get(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous tensor before reading the next
            pm = self.maps[name]
            tensor = to_megatron(pm, [self.ckpt.get(n) for n in pm.hf], self.cfg, self.padded_vocab)
            self._last = (name, tensor.to(self.dtype))
        return self._last[1]

    def region(self, key: str, offsets, sizes) -> torch.Tensor:
        """The chunk of dist-checkpoint tensor ``key`` at global ``offsets``/``sizes``."""
        layer = None
        if key.startswith("decoder.layers."):  # stacked: dim 0 is the layer
            if sizes[0] != 1:
                raise RuntimeError(f"{key}: expected one layer per chunk, got {sizes}")
            layer, offsets, sizes = offsets[0], offsets[1:], sizes[1:]
        tensor = self.get(full_name(key, layer))
        for dim, (start, length) in enumerate(zip(offsets, sizes)):
            tensor = tensor.narrow(dim, start, length)
        if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # torch.save writes
        return tensor.reshape(sizes if layer is None else (1, *sizes))  # whole storages


def _manifest_extra(ckpt: HFCheckpoint, dtype: torch.dtype) -> dict:
    return {"source": "hf", "hf_dir": str(ckpt.dir.resolve()), "hf_config": ckpt.config,
            "hf_generation_config": ckpt.generation_config, "dtype": dtype_name(dtype)}


def hf_to_megasyne(hf_dir, output, *, tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Convert; returns the checkpoint root (load it with ``load_checkpoint(root, chunks)``).

    tp*pp == 1 in a plain process: the streaming single-process path. Otherwise every rank
    of a torchrun job with WORLD_SIZE == tp*pp must call it (a multiple works too: the
    data-parallel replicas load the same weights and Megatron saves one copy).
    """
    output = Path(output).resolve()
    ckpt, cfg, dtype = inspect_hf(hf_dir, tp=tp, pp=pp, dtype=dtype)
    check_output(output, overwrite, inputs=(hf_dir,))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world % (tp * pp):
        raise HFConversionError(f"layout tp={tp} x pp={pp} needs a multiple of {tp * pp} ranks, "
                                f"this job has {world} (torchrun --nproc_per_node={tp * pp})")
    if world == 1:
        return _convert_streaming(ckpt, cfg, dtype, output, progress)
    return _convert_parallel(ckpt, cfg, dtype, output, ParallelDims(tp=tp, pp=pp, world_size=world),
                             progress)


def _init_single_process() -> bool:
    """True if no process group exists yet (init_parallel then makes a 1-rank one with an
    in-process store, and we destroy it at the end)."""
    import torch.distributed as dist

    return not dist.is_initialized()


def _convert_streaming(ckpt, cfg, dtype, output: Path, progress: bool) -> Path:
    from megatron.core import dist_checkpointing

    from megasyne.checkpoint.dist import (
        DIST_OPT_METADATA,
        FORMAT,
        MANIFEST,
        iter_name,
        model_sharded_state_dict,
    )
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.parallel.init import destroy_parallel, init_parallel

    dims = ParallelDims()
    owned = _init_single_process()
    init_parallel(dims)
    try:
        runtime = ModelRuntime(dtype=dtype, init_weights=False, use_te=False,
                               triton_kernels=False, attention="megatron")
        with torch.device("meta"):  # structure only: no parameter memory
            chunks = build_model(cfg, dims, runtime)
        state = model_sharded_state_dict(chunks)
        source = MegatronFromHF(ckpt, cfg, cfg.padded_vocab_size(1), dtype)
        partial = partial_dir(output)
        shutil.rmtree(partial, ignore_errors=True)
        final = partial / iter_name(0)
        (final / "dist").mkdir(parents=True)
        try:
            dist_checkpointing.save(state, str(final / "dist"),
                                    sharded_strategy=_streaming_strategy(source, progress),
                                    content_metadata=dict(DIST_OPT_METADATA))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        from megasyne.checkpoint.integrity import digest_checkpoint

        manifest = dict(format=FORMAT, iteration=0, model=cfg.to_dict(), layout=dims.layout_dict(),
                        has_optimizer=False, extra=_manifest_extra(ckpt, dtype),
                        files=digest_checkpoint(final, exclude=(MANIFEST,)))
        (final / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        (partial / "latest").write_text(final.name + "\n")
        _publish_checkpoint(partial, output)
    finally:
        if owned:
            destroy_parallel()
    return output


def _streaming_strategy(source: MegatronFromHF, progress: bool):
    """A torch_dist save strategy whose tensor bytes come from ``source`` while writing.

    Same translation and planner as Megatron's TorchDistSaveShardedStrategy (so the
    directory is the same format, read by the same loader); only the data differs: the
    state dict holds meta tensors and ``resolve_data`` converts each chunk on demand, and
    the writer streams items to the file one by one instead of staging them all in memory.
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    class Planner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk, props = write_item.tensor_data.chunk, write_item.tensor_data.properties
            tensor = source.region(write_item.index.fqn, list(chunk.offsets), list(chunk.sizes))
            return tensor.to(props.dtype)

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            name = f"{plan.storage_data.prefix}0.distcp"
            results = []
            with _progress(len(plan.items), "hf -> megasyne", progress) as bar, \
                    open(Path(self.path) / name, "wb") as stream:
                for item in plan.items:
                    data = planner.resolve_data(item)
                    offset = stream.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        stream.write(data.getbuffer())
                    else:
                        torch.save(data, stream)
                    del data
                    length = stream.tell() - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(name, offset, length)))
                    bar.update()
                stream.flush()
                os.fsync(stream.fileno())
            future = Future()
            future.set_result(results)
            return future

    class Strategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(state, False),
                     storage_writer=Writer(str(checkpoint_dir), thread_count=1),
                     planner=Planner(dedup_replicated_tensors=False, flatten_state_dict=False))

    return Strategy("torch_dist", 1)


def _convert_parallel(ckpt, cfg, dtype, output: Path, dims: ParallelDims, progress: bool) -> Path:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megasyne.checkpoint.dist import save_checkpoint
    from megasyne.checkpoint.sharding import layer_offset_map, shard, to_global_name, unwrap
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.parallel.init import init_parallel

    init_parallel(dims)
    runtime = ModelRuntime(dtype=dtype, init_weights=False, use_te=False, triton_kernels=False,
                           attention="megatron")
    chunks = build_model(cfg, dims, runtime)
    source = MegatronFromHF(ckpt, cfg, cfg.padded_vocab_size(dims.tp), dtype)
    tp_rank = ps.get_tensor_model_parallel_rank()
    rank0 = dist.get_rank() == 0
    params = [(to_global_name(n, layer_offset_map(c)), p)
              for c in chunks for n, p in unwrap(c).named_parameters()]
    with torch.no_grad(), _progress(len(params), "hf -> megasyne (rank 0)", progress and rank0) as bar:
        for gname, param in params:
            piece = shard(source.get(gname), param, gname, tp_rank, dims.tp)
            if piece.shape != param.shape:
                raise RuntimeError(f"{gname}: shard {tuple(piece.shape)} != {tuple(param.shape)}")
            param.copy_(piece)
            bar.update()
    source._last = None
    partial = partial_dir(output)
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    save_checkpoint(partial, 0, chunks, model_config=cfg.to_dict(), layout=dims.layout_dict(),
                    extra=_manifest_extra(ckpt, dtype))
    if rank0:
        _publish_checkpoint(partial, output)
    dist.barrier()
    return output


# --------------------------------------------------------------------------- megasyne reading

class MegasyneCheckpoint:
    """Read one full Megatron parameter at a time from a megasyne checkpoint.

    The dist checkpoint is a torch-DCP directory; its ``.metadata`` lists each stacked
    tensor's saved chunks (one per layer and TP shard, whatever layout saved it). A read
    plans only the chunks overlapping one layer, so memory stays at one parameter.
    """

    def __init__(self, path: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader

        from megasyne.checkpoint.dist import read_manifest, resolve

        self.path = resolve(path)
        self.manifest = read_manifest(self.path)
        try:
            self.config = LlamaConfig.from_dict(self.manifest["model"])
        except (ModelConfigError, TypeError) as exc:
            raise HFConversionError(f"{self.path}: model config in the manifest: {exc}") from None
        self._reader = FileSystemReader(str(self.path / "dist"))
        self._metadata = self._reader.read_metadata()

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype] | None:
        """(global shape, dtype) of the stored tensor holding full parameter ``name``."""
        key, layer = dist_key(name)
        md = self._metadata.state_dict_metadata.get(key)
        if md is None or not hasattr(md, "chunks"):
            return None
        size = tuple(md.size)
        return (size[1:] if layer is not None else size), md.properties.dtype

    def validate(self) -> torch.dtype:
        """Every parameter present with the manifest's shapes; returns the stored dtype."""
        cfg, problems, dtypes = self.config, [], set()
        megatron_shapes = _megatron_shapes(cfg)
        for pm in param_maps(cfg):
            meta = self.meta(pm.megatron)
            want = megatron_shapes[pm.megatron]
            if meta is None:
                problems.append(f"{pm.megatron} is missing")
                continue
            shape, dtype = meta
            dtypes.add(dtype)
            key, layer = dist_key(pm.megatron)
            stacked = self._metadata.state_dict_metadata[key].size
            if layer is not None and stacked[0] != cfg.num_layers:
                problems.append(f"{key} stacks {stacked[0]} layers, manifest says {cfg.num_layers}")
            elif pm.kind == "vocab" and (shape[0] < cfg.vocab_size or shape[1:] != want[1:]):
                problems.append(f"{pm.megatron}: {shape}, need >= {cfg.vocab_size} rows x {want[1:]}")
            elif pm.kind != "vocab" and shape != want:
                problems.append(f"{pm.megatron}: {shape}, manifest implies {want}")
        if problems:
            raise HFConversionError(f"{self.path}: checkpoint does not match its manifest: "
                                    + "; ".join(problems[:4]))
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def read(self, name: str) -> torch.Tensor:
        key, layer = dist_key(name)
        md = self._metadata.state_dict_metadata[key]
        size = list(md.size)
        offsets = [0] * len(size)
        if layer is not None:
            offsets[0], size[0] = layer, 1
        buf = torch.empty(size, dtype=md.properties.dtype)
        _read_region(self._reader, self._metadata, key, offsets, buf)
        return buf[0] if layer is not None else buf


def _read_region(reader, metadata, key: str, offsets: list[int], buf: torch.Tensor) -> None:
    """Fill ``buf`` with the region of stored tensor ``key`` that starts at ``offsets``."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class _RegionPlanner(LoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            pass

        def create_local_plan(self):
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
            return LoadPlan(create_read_items_for_chunk_list(
                key, metadata.state_dict_metadata[key], [chunk]))

        def create_global_plan(self, plans):
            return plans

        def finish_plan(self, plan):
            return plan

        def load_bytes(self, read_item, value):
            pass

        def resolve_tensor(self, read_item):
            view = buf
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                view = view.narrow(dim, start, length)
            return view

        def commit_tensor(self, read_item, tensor):
            pass

    planner = _RegionPlanner()
    plan = planner.create_local_plan()
    reader.set_up_storage_reader(metadata, True)
    plan = reader.prepare_global_plan([reader.prepare_local_plan(plan)])[0]
    reader.read_data(plan, planner).wait()


def _megatron_shapes(cfg: LlamaConfig, padded_vocab: int | None = None) -> dict[str, tuple]:
    """Full Megatron parameter name -> shape (TP1 layout)."""
    hf = hf_shapes(cfg)
    out = {}
    for pm in param_maps(cfg):
        shapes = [hf[n] for n in pm.hf]
        if pm.kind == "vocab":
            out[pm.megatron] = (padded_vocab or cfg.vocab_size, cfg.hidden_size)
        elif pm.kind in ("qkv", "fc1"):
            out[pm.megatron] = (sum(s[0] for s in shapes), cfg.hidden_size)
        else:
            out[pm.megatron] = shapes[0]
    return out


# --------------------------------------------------------------------------- megasyne -> HF

def _base_config(hf_config, manifest: dict) -> tuple[dict | None, dict | None]:
    """(config.json base, generation_config) from --hf-config or the manifest's HF source."""
    extra = manifest.get("extra") or {}
    base, gen = extra.get("hf_config"), extra.get("hf_generation_config")
    if hf_config is not None:
        path = Path(hf_config)
        directory = path if path.is_dir() else path.parent
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise HFConversionError(f"--hf-config {hf_config}: no config.json there")
        base = json.loads(path.read_text())
        gen_path = directory / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else gen
    return base, gen


def _write_weights(src, cfg, partial: Path, shards, files, weight_map, dtype, progress) -> int:
    """Read each parameter once, split it into its HF tensors, stream them to their files."""
    total, writers = 0, {}
    maps = param_maps(cfg)
    with _progress(len(maps), "megasyne -> hf", progress) as bar:
        for pm in maps:
            parts = to_hf(pm, src.read(pm.megatron), cfg)
            for name, tensor in zip(pm.hf, parts):
                f = weight_map[name]
                if f not in writers:
                    writers[f] = SafetensorsStreamWriter(partial / f, shards[files.index(f)])
                    total += writers[f].total_bytes
                writers[f].write(name, tensor.to(dtype))
                if writers[f].complete:
                    writers[f].close()
            bar.update()
    return total


def megasyne_to_hf(checkpoint, output, *, dtype: torch.dtype | None = None, tokenizer_dir=None,
                   max_shard_size: str | int = "5GB", hf_config=None, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Write a transformers-loadable directory from a megasyne (or training) checkpoint."""
    output = Path(output).resolve()
    src = MegasyneCheckpoint(checkpoint)
    cfg = src.config
    stored = src.validate()  # every parameter present, shapes as the manifest says
    dtype = dtype or stored
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise HFConversionError(f"unsupported output dtype {dtype}")
    base, generation = _base_config(hf_config, src.manifest)
    tokenizer_files = []
    if tokenizer_dir is not None:
        tokenizer_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES
                           if (Path(tokenizer_dir) / f).is_file()]
        if not tokenizer_files:
            raise HFConversionError(f"--tokenizer-dir {tokenizer_dir}: none of {TOKENIZER_FILES}")
    check_output(output, overwrite, inputs=(checkpoint, tokenizer_dir, hf_config))

    shapes = hf_shapes(cfg)
    shards = plan_shards([(n, shapes[n], dtype) for n in shapes], parse_size(max_shard_size))
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {e[0]: f for f, shard in zip(files, shards) for e in shard}
    partial = partial_dir(output)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        total = _write_weights(src, cfg, partial, shards, files, weight_map, dtype, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config_from_llama(cfg, dtype=dtype, base=base)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation:
        (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for f in tokenizer_files:
        shutil.copy2(f, partial / f.name)
    publish(partial, output, marker=HF_MARKER, owns=owned_by_hf_export)
    return output
