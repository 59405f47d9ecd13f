"""Hugging Face Llama <-> megasyne: config mapping, tensor mapping, lazy readers and writers.

Everything here works one tensor at a time, so converting a model needs memory for the
largest tensor (the embedding), not for the model:

- ``HFCheckpoint`` reads a Hugging Face directory (config.json + safetensors, sharded with
  an index or not, or PyTorch ``.bin`` files) lazily: shapes and dtypes come from file
  headers, a tensor's bytes are read only when asked for.
- ``hf_convert.MegasyneCheckpoint`` reads single tensors (one layer of a stacked Megatron
  tensor) out of a megasyne checkpoint's torch-DCP directory, whatever TP/PP layout wrote
  it, without Megatron and without a process group (``dist_key`` below names them).
- ``SafetensorsStreamWriter`` writes a safetensors file whose header is computed up front,
  then the tensors one by one.

Names. HF names (``model.layers.3.self_attn.q_proj.weight``) map to the *full* Megatron
names of ``megasyne.checkpoint.sharding`` (``decoder.layers.3.self_attention.linear_qkv.weight``).
In a dist checkpoint the layers are stacked: the key drops the layer number
(``decoder.layers.self_attention.linear_qkv.weight``, global shape [layers, ...]) and the
norms are stored under Transformer-Engine's names (``input_layernorm`` ->
``self_attention.linear_qkv.layer_norm_weight``), for the local and the TE layer spec alike.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from megasyne.errors import ConversionError
from megasyne.model.config import LlamaConfig, ModelConfigError, RopeScaling


class HFConversionError(ConversionError, ValueError):
    """Input that cannot be converted; the message says which file/field and why."""


HF_ARCHITECTURE = "LlamaForCausalLM"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling of config.json's dtype/torch_dtype)."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- config mapping

def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, llama3 scaling) from transformers 5.x ``rope_parameters`` or 4.x
    top-level ``rope_theta`` + ``rope_scaling`` (a 4.x config has no rope_parameters).

    Read as transformers 5.x reads it: ``factor``, ``low_freq_factor`` and
    ``high_freq_factor`` are required (transformers refuses a config without them), a missing
    ``original_max_position_embeddings`` is the model's ``max_position_embeddings``.
    """
    params = hf.get("rope_parameters") or {}
    spec = params or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise HFConversionError(
            f"config.json: unsupported rope type {rope_type!r}; megasyne supports 'default' "
            f"and Llama-3-style 'llama3' scaling only")
    where = "rope_parameters" if params else "rope_scaling"
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in spec]
    if missing:
        raise HFConversionError(f"config.json: {where} (rope_type llama3) lacks {missing}; "
                                f"transformers needs them too")
    original = spec.get("original_max_position_embeddings",
                        hf.get("max_position_embeddings", 2048))
    if isinstance(original, float) and original.is_integer():  # 8192.0: transformers takes it
        original = int(original)
    try:
        scaling = RopeScaling(
            factor=_number(spec["factor"], where, "factor"),
            low_freq_factor=_number(spec["low_freq_factor"], where, "low_freq_factor"),
            high_freq_factor=_number(spec["high_freq_factor"], where, "high_freq_factor"),
            original_max_position_embeddings=original)
    except ModelConfigError as exc:
        raise HFConversionError(f"config.json: {where}: {exc}") from None
    return float(theta), scaling


def _number(value, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HFConversionError(f"config.json: {where}.{key} must be a number, got {value!r}")
    return float(value)


def llama_config_from_hf(hf: dict, *, name: str = "hf") -> LlamaConfig:
    """A validated ``LlamaConfig`` from a config.json dict; refuses anything but a plain Llama."""
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type != "llama":
        raise HFConversionError(
            f"config.json: model_type is {model_type!r}, not 'llama': only Llama-architecture "
            f"models (LlamaForCausalLM) can be converted")
    if archs and HF_ARCHITECTURE not in archs:
        raise HFConversionError(f"config.json: architectures {archs} do not include "
                                f"{HF_ARCHITECTURE!r}")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise HFConversionError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported "
                                f"(Llama's SwiGLU uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HFConversionError(f"config.json: {flag}=true is not supported (Llama has no biases)")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in hf]
    if missing:
        raise HFConversionError(f"config.json lacks {missing}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hf["hidden_size"]:
        raise HFConversionError(
            f"config.json: head_dim {head_dim} x {heads} heads != hidden_size "
            f"{hf['hidden_size']}; megasyne needs head_dim = hidden_size / num_attention_heads")
    theta, scaling = _rope_from_hf(hf)
    try:
        return LlamaConfig(
            name=name, num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_method_std=float(hf.get("initializer_range", 0.02)))
    except ModelConfigError as exc:
        raise HFConversionError(f"config.json: {exc}") from None


def hf_config_from_llama(cfg: LlamaConfig, *, dtype: torch.dtype, base: dict | None = None) -> dict:
    """config.json for ``cfg``: every architecture field from ``cfg``, the rest from ``base``.

    ``base`` (the source model's config.json, kept in a converted checkpoint's manifest)
    supplies token ids and the like, and decides the spelling: a transformers-5 base gets
    ``rope_parameters``/``dtype``, a 4.x base ``rope_theta``/``rope_scaling``/``torch_dtype``;
    without a base both spellings are written (4.x and 5.x read either).
    """
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                       high_freq_factor=s.high_freq_factor,
                       original_max_position_embeddings=s.original_max_position_embeddings)
    parameters = dict(scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    out = dict(base) if base else {"use_cache": True}
    out.update(
        architectures=[HF_ARCHITECTURE], model_type="llama", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_method_std, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1)
    legacy = not base or "rope_parameters" not in base  # 4.x spelling needed
    if not base or "rope_parameters" in base:
        out["rope_parameters"] = parameters
    if legacy or "rope_theta" in base:
        out["rope_theta"] = cfg.rope_theta
    if legacy or "rope_scaling" in base:
        out["rope_scaling"] = scaling
    for key in ("dtype", "torch_dtype"):
        if not base or key in base or ("dtype" not in base and "torch_dtype" not in base):
            out[key] = dtype_name(dtype)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- tensor mapping

@dataclass(frozen=True)
class ParamMap:
    """One Megatron parameter (full TP1/PP1 name) and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: str
    """"copy", "vocab" (rows padded/stripped), "qkv" (per-group interleave), "fc1" ([gate; up])."""


def param_maps(cfg: LlamaConfig) -> list[ParamMap]:
    maps = [ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        maps += [
            ParamMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy"),
            ParamMap(m + "self_attention.linear_qkv.weight",
                     tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
            ParamMap(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "copy"),
            ParamMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "copy"),
            ParamMap(m + "mlp.linear_fc1.weight",
                     (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "fc1"),
            ParamMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy"),
        ]
    maps.append(ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if not cfg.tie_word_embeddings:
        maps.append(ParamMap("output_layer.weight", ("lm_head.weight",), "vocab"))
    return maps


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name -> the shape config.json implies (in file order)."""
    h, d, ffn = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    by_suffix = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h),
                 "mlp.down_proj.weight": (h, ffn)}
    out = {}
    for pm in param_maps(cfg):
        for name in pm.hf:
            if name.startswith("model.layers."):
                out[name] = by_suffix[name.split(".", 3)[3]]
            elif name == "model.norm.weight":
                out[name] = (h,)
            else:  # embed_tokens, lm_head
                out[name] = (cfg.vocab_size, h)
    return out


def to_megatron(pm: ParamMap, tensors: list[torch.Tensor], cfg: LlamaConfig,
                padded_vocab: int) -> torch.Tensor:
    """HF tensors -> the full Megatron parameter (TP1 layout)."""
    if pm.kind == "copy":
        return tensors[0]
    if pm.kind == "vocab":
        t = tensors[0]
        if padded_vocab == t.shape[0]:
            return t
        out = t.new_zeros(padded_vocab, t.shape[1])  # padding rows stay zero
        out[: t.shape[0]] = t
        return out
    if pm.kind == "fc1":
        return torch.cat(tensors, dim=0)  # [gate; up]: SwiGLU's gate comes first in Megatron
    # qkv: Megatron stores, for each query group g, [q heads of g; k_g; v_g] (that is what
    # lets TP hand whole groups to each rank); HF stores all q, all k, all v.
    q, k, v = tensors
    groups, d, h = cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    per_group = cfg.num_attention_heads // groups
    return torch.cat([q.reshape(groups, per_group * d, h), k.reshape(groups, d, h),
                      v.reshape(groups, d, h)], dim=1).reshape(-1, h)


def to_hf(pm: ParamMap, tensor: torch.Tensor, cfg: LlamaConfig) -> list[torch.Tensor]:
    """Inverse of ``to_megatron``: the full Megatron parameter -> its HF tensors."""
    if pm.kind == "copy":
        return [tensor]
    if pm.kind == "vocab":
        return [tensor[: cfg.vocab_size]]  # strip the TP padding rows
    if pm.kind == "fc1":
        return list(tensor.chunk(2, dim=0))
    groups, d, h = cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    per_group = cfg.num_attention_heads // groups
    q, k, v = tensor.reshape(groups, (per_group + 2) * d, h).split([per_group * d, d, d], dim=1)
    return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]


# Where the full Megatron names live in a dist checkpoint (see module docstring).
_NORM_KEYS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
              "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_NORM_NAMES = {v: k for k, v in _NORM_KEYS.items()}


def dist_key(full_name: str) -> tuple[str, int | None]:
    """``decoder.layers.3.input_layernorm.weight`` ->
    (``decoder.layers.self_attention.linear_qkv.layer_norm_weight``, 3)."""
    if not full_name.startswith("decoder.layers."):
        return full_name, None
    layer, suffix = full_name[len("decoder.layers."):].split(".", 1)
    return "decoder.layers." + _NORM_KEYS.get(suffix, suffix), int(layer)


def full_name(key: str, layer: int | None) -> str:
    """Inverse of ``dist_key``."""
    if layer is None:
        return key
    suffix = key[len("decoder.layers."):]
    return f"decoder.layers.{layer}." + _NORM_NAMES.get(suffix, suffix)


# --------------------------------------------------------------------------- HF reading

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


class HFCheckpoint:
    """A Hugging Face model directory, read lazily tensor by tensor."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise HFConversionError(f"{self.dir}: no config.json, not a Hugging Face model directory")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise HFConversionError(f"{cfg_path}: invalid JSON ({exc})") from None
        self.generation_config = None
        if (self.dir / "generation_config.json").is_file():
            self.generation_config = json.loads((self.dir / "generation_config.json").read_text())
        self._open: dict[Path, object] = {}
        self._file_of = self._discover()

    def _discover(self) -> dict[str, Path]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            path = self.dir / index
            if path.is_file():
                weight_map = json.loads(path.read_text())["weight_map"]
                files = {f: self.dir / f for f in set(weight_map.values())}
                absent = sorted(f for f, p in files.items() if not p.is_file())
                if absent:
                    raise HFConversionError(f"{path} names shard files that are missing: {absent}")
                return {name: files[f] for name, f in weight_map.items()}
        files = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("pytorch_model*.bin"))
        if not files:
            raise HFConversionError(f"{self.dir}: no weights (model.safetensors[.index.json] or "
                                    f"pytorch_model.bin[.index.json])")
        out = {}
        for f in files:
            for name in self._handle(f).keys():
                out[name] = f
        return out

    def _handle(self, path: Path):
        """A safetensors header reader, or the state dict of a ``.bin`` file (mmap'd)."""
        if path not in self._open:
            if path.suffix == ".safetensors":
                self._open[path] = _SafetensorsFile(path)
            else:
                # Only one .bin stays mapped: pages read through an mmap count as this
                # process's memory until it is unmapped, so the previous file is dropped.
                for other in [p for p, h in self._open.items() if isinstance(h, dict)]:
                    del self._open[other]
                try:  # zip-format .bin: mmap, nothing is read until a tensor is used
                    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError:  # legacy (pre-1.6) format cannot be mmap'd
                    sd = torch.load(path, map_location="cpu", weights_only=True)
                self._open[path] = sd
        return self._open[path]

    def names(self) -> list[str]:
        return list(self._file_of)

    def _meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        handle = self._handle(self._file_of[name])
        if isinstance(handle, dict):
            t = handle[name]
            return tuple(t.shape), t.dtype
        return handle.meta(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta(name)[1]

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(self._file_of[name])
        if isinstance(handle, dict):
            return handle[name].clone()  # out of the mmap into private memory
        return handle.read(name)

    def close(self) -> None:
        self._open.clear()


class _SafetensorsFile:
    """Header + positioned reads of one safetensors file.

    Not ``safe_open``: it memory-maps the file, and every page a read touches then counts
    in this process's resident memory until the map is closed (the whole model, by the end
    of a conversion). Plain reads into a fresh tensor keep the footprint at one tensor.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise HFConversionError(f"{path}: not a safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self.start, self.header = 8 + n, header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.start + end > path.stat().st_size:  # caught now, not halfway through a write
            raise HFConversionError(f"{path}: truncated ({path.stat().st_size} bytes, the header "
                                    f"needs {self.start + end})")

    def keys(self):
        return self.header.keys()

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self.header[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise HFConversionError(f"{self.path}: {name} has unsupported dtype {entry['dtype']}")
        return tuple(entry["shape"]), _ST_DTYPES[entry["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        shape, dtype = self.meta(name)
        begin, end = self.header[name]["data_offsets"]
        out = torch.empty(shape, dtype=dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        if end - begin != len(buf):
            raise HFConversionError(f"{self.path}: {name} holds {end - begin} bytes, its "
                                    f"shape {shape} x {dtype} needs {len(buf)}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start + begin)
            view, done = memoryview(buf), 0
            while done < len(buf):
                got = f.readinto(view[done:])
                if not got:
                    raise HFConversionError(f"{self.path}: truncated while reading {name}")
                done += got
        return out


def validate_hf(ckpt: HFCheckpoint, cfg: LlamaConfig) -> torch.dtype:
    """Check the tensors against config.json before anything is written; returns their dtype."""
    expected = hf_shapes(cfg)
    present = set(ckpt.names())
    missing = [n for n in expected if n not in present]
    if missing:
        hint = (" (config.json says tie_word_embeddings=false, so lm_head.weight is needed)"
                if missing == ["lm_head.weight"] else "")
        raise HFConversionError(f"{ckpt.dir}: {len(missing)} tensors missing, e.g. {missing[:4]}{hint}")
    ignored = {n for n in present if n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints also store the (equal) head
    unexpected = sorted(present - set(expected) - ignored)
    if unexpected:
        raise HFConversionError(
            f"{ckpt.dir}: unexpected tensors for a Llama with this config.json, e.g. "
            f"{unexpected[:4]} ({len(unexpected)} in all)")
    bad = [f"{n}: {ckpt.shape(n)} but config.json implies {s}"
           for n, s in expected.items() if ckpt.shape(n) != s]
    if bad:
        raise HFConversionError(
            f"{ckpt.dir}: tensor shapes do not match config.json (hidden_size={cfg.hidden_size}, "
            f"heads={cfg.num_attention_heads}, kv_heads={cfg.num_query_groups}, "
            f"intermediate_size={cfg.ffn_hidden_size}, vocab_size={cfg.vocab_size}): "
            + "; ".join(bad[:4]) + (f" ... ({len(bad)} in all)" if len(bad) > 4 else ""))
    dtypes = {ckpt.dtype(n) for n in expected}
    if any(not d.is_floating_point for d in dtypes):
        raise HFConversionError(f"{ckpt.dir}: non-float weights {dtypes} (quantised checkpoint?)")
    if len(dtypes) == 1:
        return dtypes.pop()
    declared = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    return DTYPES.get(declared, torch.float32)


# --------------------------------------------------------------------------- HF writing

def parse_size(text: str | int) -> int:
    """"5GB" / "500MB" / "2GiB" / 1000 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def plan_shards(entries: list[tuple[str, tuple, torch.dtype]], max_bytes: int) -> list[list]:
    """Split (name, shape, dtype) entries, in order, into files of at most max_bytes
    (a tensor larger than that gets a file of its own)."""
    shards, current, size = [], [], 0
    for entry in entries:
        n = math.prod(entry[1]) * entry[2].itemsize
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current:
        shards.append(current)
    return shards


class SafetensorsStreamWriter:
    """Write a safetensors file whose tensors arrive one at a time, in planned order.

    Format: little-endian u64 header length, JSON header (space-padded to 8 bytes) with
    each tensor's dtype, shape and [begin, end) byte range, then the raw bytes.
    """

    def __init__(self, path: str | os.PathLike, entries: Iterable[tuple[str, tuple, torch.dtype]],
                 metadata: dict | None = None):
        self.entries = list(entries)
        header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
        for name, shape, dtype in self.entries:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total_bytes = offset
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self.entries[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want_name, tuple(shape), dtype):
            raise RuntimeError(f"safetensors stream: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                               f"expected {want_name} {tuple(shape)} {dtype}")
        self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.entries)

    def close(self) -> None:
        if not self.complete:
            raise RuntimeError(f"safetensors stream closed after {self._next} of "
                               f"{len(self.entries)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
