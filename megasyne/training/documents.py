"""Document masking inside packed samples: the run config's ``document_masking`` section, the EOD
id it needs (from the data's preprocess reports), and per-row positions, loss mask and document
ids.

A training sample is ``seq_length + 1`` tokens cut from a stream of documents, each ended by the
EOD token (``tools/preprocess_data.py --append-eod``). Without masking a token attends to every
earlier token of the sample, across document boundaries. With ``enabled`` a token attends only
to earlier tokens of its own document and its position restarts at 0 after each EOD (Llama-3 was
pre-trained so); ``eod_mask_loss`` drops the loss of predicting a document's first token from
the EOD of the previous one.

The rules are Megatron-LM's (``_get_ltor_masks_and_position_ids`` in
``megatron/core/datasets/gpt_dataset.py``, megatron-core 0.16.1), applied to the input tokens
``tokens[:-1]`` of a sample:

- ``reset_position_ids``: after an EOD at input position ``i`` positions restart at 0 at
  ``i + 1``; the EOD keeps the position that continues its own document.
- ``reset_attention_mask``: positions after ``i`` do not see positions ``<= i``, so the EOD
  belongs to the document it ends (it still sees that document, and nothing of the next).
- ``eod_mask_loss``: ``loss_mask[tokens == eod] = 0``: no loss where the *input* is the EOD,
  i.e. on the label that follows it (the next document's first token); the EOD itself, as
  the label of the document's last token, is still trained.

``enabled`` is their ``reset_position_ids`` and ``reset_attention_mask`` together (one without
the other attends across documents with positions that restart, or keeps positions running
past a boundary the attention no longer crosses). ``tests/training/test_documents.py`` compares
these functions with Megatron-LM's on random rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megasyne.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class DocumentMasking:
    """The run config's ``document_masking`` section (off by default)."""

    enabled: bool = False
    """Inside a packed sample, each token attends only to earlier tokens of its own document,
    and positions (RoPE) restart at 0 after each EOD (Megatron-LM's reset_attention_mask +
    reset_position_ids). Needs data preprocessed with --append-eod; validation is scored the
    same way."""
    eod_mask_loss: bool = False
    """No loss on the label that follows an EOD (the next document's first token, predicted
    from the end of the previous one): Megatron-LM's eod_mask_loss. Independent of
    ``enabled``; also needs the EOD id."""

    def __post_init__(self):
        for key in ("enabled", "eod_mask_loss"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")

    @property
    def needs_eod(self) -> bool:
        return self.enabled or self.eod_mask_loss


def eod_token_id(dataset, masking: DocumentMasking, what: str) -> int | None:
    """The EOD id every source of ``dataset`` (a MixtureDataset) was preprocessed with, read from
    its ``<prefix>.report.json``; None when ``masking`` needs none. Fails, naming the source,
    when a source has no report, its tokenizer no EOD, or it was preprocessed without
    --append-eod (its documents then have no separator to find)."""
    if not masking.needs_eod:
        return None
    fix = "re-preprocess it with tools/preprocess_data.py --append-eod, or set " \
          "document_masking.enabled and document_masking.eod_mask_loss to false"
    ids = {}
    for source in dataset.meta["sources"]:
        prefix = source["prefix"]
        report = Path(prefix + ".report.json")
        if not report.is_file():
            raise ConfigError(f"document_masking ({what}): {report} not found, so the EOD id of "
                              f"{prefix} is unknown: {fix}")
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"document_masking ({what}): {report} is unreadable ({exc}): "
                              f"{fix}") from None
        eod = data.get("tokenizer", {}).get("eod_id")
        if eod is None:
            raise ConfigError(f"document_masking ({what}): {report} records no EOD id for the "
                              f"tokenizer of {prefix}: {fix}")
        if not data.get("append_eod"):
            raise ConfigError(f"document_masking ({what}): {prefix} was preprocessed without "
                              f"--append-eod ({report}), so its documents have no EOD "
                              f"separators: {fix}")
        ids[prefix] = int(eod)
    if len(set(ids.values())) != 1:
        raise ConfigError(f"document_masking ({what}): the sources record different EOD ids "
                          f"({ids}); preprocess them with one tokenizer")
    return next(iter(ids.values()))


def document_ids(tokens: np.ndarray, eod: int) -> np.ndarray:
    """int32 [b, s]: for each input token, the number of EODs before it in its row (its
    document's number; an EOD belongs to the document it ends)."""
    is_eod = (tokens == eod).astype(np.int32)                   # [b, s]
    return (np.cumsum(is_eod, axis=1, dtype=np.int32) - is_eod).astype(np.int32)


def reset_position_ids(docs: np.ndarray) -> np.ndarray:
    """int64 [b, s]: each token's offset from the first token of its document (``docs`` from
    :func:`document_ids`, or any ids that are constant exactly over each document)."""
    b, s = docs.shape
    arange = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
    starts = np.ones((b, s), dtype=bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    first = np.maximum.accumulate(np.where(starts, arange, 0), axis=1)  # [b, s]
    return arange - first


def eod_loss_mask(tokens: np.ndarray, eod: int) -> np.ndarray:
    """float32 [b, s]: 0 where the input token is the EOD, else 1."""
    return (tokens != eod).astype(np.float32)

