"""What a run has read, in its checkpoints: resume exactly onto the same data, refuse, or rebase.

Every checkpoint records the run's data identity under the key ``data``: the mixture index's
fingerprint and inputs (the resolved recipe, each source's data fingerprint, the code version),
each source's stream position after the consumed samples (``cursors``: how many samples of
each source's stream the run has read), and the last rebase, if any.

On resume, before the model is loaded:

- same fingerprint: the run continues at its consumed-sample count (sample i is a pure
  function of i), after re-deriving a recorded rebase; once the hooks have restored their own
  re-blended intervals, the cursors the index gives at that count must equal the saved ones;
- another fingerprint (the recipe or a source's data was edited since the save): resuming at
  the same count would read another index's samples there, repeating some and skipping others,
  so the resume is refused, naming what changed;
- unless the run allows a rebase (``rebase_data: true``): then every source continues from its
  saved position under the new recipe: the samples from the consumed count on are blended
  again (the same greedy, the new stages' weights) starting from the saved cursors
  (``megasyne.data.overlay``); sources new to the recipe start at 0. Nothing is read twice,
  nothing is skipped. The index of the old inputs is kept beside the new one
  (``index.<fingerprint[:12]>``) as the record of what was read before.
"""

from __future__ import annotations

import numpy as np

from megasyne.data.mixture import what_changed
from megasyne.data.overlay import MixtureOverlay, OverlayError, stream_cursors
from megasyne.training.config import ConfigError
from megasyne.training.metrics import print0


class DataIdentityError(ConfigError):
    """The run's data differs from what its checkpoint was trained on."""


class RunData:
    """The data identity of a run (see the module docstring)."""

    key = "data"

    def __init__(self, dataset, *, rebase_allowed: bool, adaptive: bool):
        self.dataset = dataset
        self.rebase_allowed = rebase_allowed
        self.adaptive = adaptive
        self.rebase: dict | None = None
        """{"at": sample, "cursors": {source: position}, "from_fingerprint": ...} of the last rebase."""

    def cursors_at(self, sample: int) -> dict[str, int]:
        ds, base, since = self.dataset, None, 0
        if self.rebase is not None:
            since = int(self.rebase["at"])
            base = [int(self.rebase["cursors"].get(n, 0)) for n in ds.source_names]
        pos = stream_cursors(ds.source_id, len(ds.source_names), sample, since=since, base=base)
        return dict(zip(ds.source_names, (int(x) for x in pos)))

    def state_dict(self, consumed: int) -> dict:
        return {"fingerprint": self.dataset.fingerprint, "inputs": self.dataset.meta["inputs"],
                "cursors": self.cursors_at(consumed), "rebase": self.rebase}

    def check(self, saved: dict | None, consumed: int, *, checkpoint: str) -> None:
        """Before loading ``checkpoint``: same data, or a rebase onto the new data, or refuse."""
        ds = self.dataset
        if saved is None:
            print0(f"warning: {checkpoint} records no data fingerprint (saved by an older "
                   f"megasyne): the data cannot be checked against it")
            return
        if saved["fingerprint"] == ds.fingerprint:
            if saved.get("rebase"):
                self.apply_rebase(saved["rebase"])
            return
        changed = what_changed(saved.get("inputs", {}), ds.meta["inputs"])
        if not self.rebase_allowed:
            raise DataIdentityError(
                f"the data changed since {checkpoint} was saved (at consumed sample {consumed}): "
                f"{changed}. Resuming would read the new index from sample {consumed} on, "
                f"repeating some samples and skipping others. Restore the recipe and data it was "
                f"trained on, or rerun with --set rebase_data=true to continue every source from "
                f"where it stopped under the new recipe")
        if self.adaptive:
            raise DataIdentityError(
                f"the data changed since {checkpoint} was saved ({changed}), and rebase_data "
                f"cannot be combined with the adaptive topic mixture yet: restore the recipe "
                f"and data, or start the new recipe in a new run_dir from these weights "
                f"(init_checkpoint)")
        dropped = sorted(set(saved["cursors"]) - set(ds.source_names))
        self.apply_rebase({"at": consumed, "cursors": dict(saved["cursors"]),
                            "from_fingerprint": saved["fingerprint"], "changed": changed})
        print0(f"rebased at consumed sample {consumed} onto the new data ({changed}): every "
               f"source continues from its saved position"
               + (f"; sources no longer in the recipe: {dropped}" if dropped else ""))

    def verify(self, saved: dict | None, consumed: int, *, checkpoint: str) -> None:
        """After every re-blended interval is in place: the positions reached equal the saved."""
        if saved is None:
            return
        now = self.cursors_at(consumed)
        want = {n: int(saved["cursors"].get(n, 0)) for n in now}  # new sources start at 0
        if now != want:
            diff = {n: (want[n], now[n]) for n in now if now[n] != want[n]}
            raise DataIdentityError(
                f"{checkpoint}: the sources' stream positions at consumed sample {consumed} "
                f"differ from the saved ones (source: (saved, now)) {diff}; the index or its "
                f"re-blended intervals are not the ones the run trained on")

    def apply_rebase(self, rebase: dict) -> None:
        """Blend everything from ``rebase["at"]`` on again, every source from its position there."""
        ds = self.dataset
        at = int(rebase["at"])
        if at > len(ds):
            raise DataIdentityError(f"the recipe now holds {len(ds)} samples, fewer than the "
                                    f"{at} the run has consumed: nothing left to rebase onto")
        overlay = MixtureOverlay(ds, None)
        cursors = np.array([int(rebase["cursors"].get(n, 0)) for n in ds.source_names],
                           dtype=np.int64)
        try:
            overlay.reblend(at, len(ds), overlay.stage_weights, cursors=cursors)
        except OverlayError as exc:
            raise DataIdentityError(f"rebase at consumed sample {at}: {exc}") from None
        self.rebase = dict(rebase)
