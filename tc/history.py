"""The per-epoch training history CSV (reports/plots/train_<agent>.csv): its writer and its reader.

One row per epoch; ``frames``, ``epoch`` and ``val_success`` are required (the plots and
the report read them, and ``dvc plots`` draws val_success over frames); every other
column is numeric. An empty cell means "not measured that epoch" (no validation; no
thoughts in BC) and reads back as nan.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from tc.params import FileFormatError

REQUIRED_COLUMNS = ("frames", "epoch", "val_success")
# Written columns, in order; some take another name than tc.train's history keys (RENAMED).
COLUMNS = ["epoch", "frames", "updates", "lr", "tf_ratio", "loss", "val_success", "val_success_ci_low",
           "val_success_ci_high", "val_episodes", "action_acc", "thought_acc", "oracle_action_acc",
           "val_loss", "train_action_acc", "train_thought_acc", "wall_time_s"]  # fmt: skip
RENAMED = {"loss": "train_loss", "action_acc": "val_action_acc", "thought_acc": "val_thought_acc",
           "oracle_action_acc": "val_oracle_action_acc"}


def history_csv(history: list[dict]) -> str:
    """CSV text of tc.train's per-epoch ``history`` rows; empty cells where a value is None or absent."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in history:
        values = [row.get(RENAMED.get(c, c)) for c in COLUMNS]
        writer.writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def _number(cell: str) -> float:
    """A CSV cell as float; empty means not measured (nan)."""
    return float(cell) if cell.strip() else math.nan


def load_history(path: str | Path) -> dict[str, list[float]]:
    """All columns of a training history CSV as floats; ValueError names the file and the problem."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FileFormatError(f"{path}: history CSV lacks columns {missing} (expected {list(REQUIRED_COLUMNS)})")
        rows = list(reader)
    try:
        return {c: [_number(r[c] or "") for r in rows] for c in reader.fieldnames}
    except ValueError as e:
        raise FileFormatError(f"{path}: non-numeric cell in history CSV ({e})") from None
