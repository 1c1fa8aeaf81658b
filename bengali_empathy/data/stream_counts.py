"""What a streamed training epoch kept and dropped, reported after every epoch (the CLI registers the callback)."""
from __future__ import annotations

import lightning as L

from .datamodule import EmpatheticDialogueDataModule

REPORTED = ("truncated", "too_long", "empty")


class StreamCounts(L.Callback):
    """Prints and logs (``data/train_{truncated,too_long,empty}_rows``) the rows a streamed epoch passed.

    An in-memory corpus was counted before the run (its statistics table); a stream is counted as
    it passes, so its counts are known only at the end of each epoch.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        counts = dm.splits.counts("train") if isinstance(dm, EmpatheticDialogueDataModule) and dm.splits else {}
        if not counts:
            return
        pl_module.print(f"streamed train rows this epoch: {counts.get('ok', 0)} kept, {counts.get('truncated', 0)} "
                        f"truncated, {counts.get('too_long', 0)} dropped as too long, "
                        f"{counts.get('empty', 0)} dropped as empty")
        for status in REPORTED:
            pl_module.log(f"data/train_{status}_rows", float(counts.get(status, 0)), on_epoch=True,
                          rank_zero_only=True)
