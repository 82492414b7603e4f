"""The full [train x queries] score matrix, written batch by batch into one safetensors file.

Scoring keeps only the top-k per query; users who need every score (e.g. for a linear datamodeling
score) ask for the matrix. It is never held in memory: the file is created with its safetensors header
(one float64 tensor "scores" [n_train, n_queries], NaN-filled) as `NAME.partial`, each batch's rows are
written in place (a memory map), and the file is renamed to `NAME` when every batch is done. Rows are
written idempotently, so a resumed stage rewrites the batches after its last checkpoint to the same
values; under torchrun every process writes its own rows into the same file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["ScoreMatrix"]


class ScoreMatrix:
    """`path` (a .safetensors file) holding tensor "scores" [rows, cols] (float64), filled by rows."""

    def __init__(self, path: str | Path, rows: int, cols: int):
        self.path, self.rows, self.cols = Path(path), int(rows), int(cols)
        self.partial = self.path.with_name(self.path.name + ".partial")
        header = {
            "scores": {"dtype": "F64", "shape": [self.rows, self.cols], "data_offsets": [0, 8 * rows * cols]},
            "__metadata__": {"layout": "scores[train_index, query_index]"},
        }
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.header = struct.pack("<Q", len(text)) + text

    @property
    def offset(self) -> int:
        return len(self.header)

    def create(self) -> None:
        """Write the header and a NaN-filled body, unless a partial file of this shape exists (resume)."""
        size = self.offset + 8 * self.rows * self.cols
        if self.partial.exists() and self.partial.stat().st_size == size:
            with open(self.partial, "rb") as f:
                if f.read(self.offset) == self.header:
                    return
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "wb") as f:
            f.write(self.header)
            nan_row = np.full(self.cols, np.nan, dtype="<f8").tobytes()
            for _ in range(self.rows):
                f.write(nan_row)

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Store `values` [len(rows), cols] at the training indices `rows`."""
        body = np.memmap(
            self.partial, dtype="<f8", mode="r+", offset=self.offset, shape=(self.rows, self.cols)
        )
        body[rows.cpu().numpy()] = values.detach().double().cpu().numpy()
        body.flush()
        del body

    def finish(self) -> None:
        """Rename the complete file to its final name."""
        os.replace(self.partial, self.path)
