"""Figures of the paper, redrawn from the pipeline's outputs (matplotlib, no display needed).

- Fig. 3: validation success vs training frames, TC vs BC, from the training history CSVs
  (one row per epoch; columns ``frames``, ``epoch``, ``val_success`` and any other numeric
  columns, e.g. ``train_loss``, ``val_action_acc``; an empty cell or "nan" where a value
  was not measured that epoch: no validation, or no thoughts in BC).
- Training curves: every history column whose name holds "loss", "action_acc" or "thought_acc".
- Fig. 4(a): zero-shot success per out-of-distribution bin, TC vs BC vs TC with oracle
  thoughts, from ood.json (schema in docs/ARCHITECTURE.md and ``load_ood``).
Success rates are fractions in [0, 1] in the files and percentages on the figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: stages run headless
import matplotlib.pyplot as plt  # noqa: E402

from tc.history import load_history  # noqa: E402
from tc.io import atomic_path  # noqa: E402
from tc.params import FileFormatError, check_fields, param  # noqa: E402

CURVE_PANELS = {"loss": "loss", "action_acc": "action accuracy", "thought_acc": "thought accuracy"}
OOD_AXES = ("behavioural", "cognitive")
OOD_AGENTS = ("tc", "bc", "oracle")
OOD_DIFFERENCE = "tc_minus_bc"  # per bin, beside the agents' cells (tc.stats.paired_difference)
AGENT_LABELS = {"tc": "Thought Cloning", "bc": "Behavioural Cloning", "oracle": "TC, oracle thoughts"}
AGENT_COLORS = {"tc": "tab:blue", "bc": "tab:orange", "oracle": "tab:green"}
FIGURES = {"success": "fig3_success_vs_frames.png", "curves": "training_curves.png", "ood": "fig4a_ood.png"}


@dataclass(frozen=True)
class PlotsConfig:
    """The ``plots:`` section of params.yaml."""

    dpi: int = param(150, ge=10, le=1200)  # resolution of reports/figures/*.png

    def __post_init__(self):
        check_fields(self, "plots")


def load_ood(path: str | Path) -> dict[str, dict[str, dict[str, dict]]]:
    """Read and check ood.json: {axis: {bin: {agent: {"success_rate": float|null, "episodes": int, ...}}}}.

    axis is "behavioural" or "cognitive"; bin is the bin's number as a string; agent is
    "tc", "bc" or "oracle" (any may be absent); success_rate is a fraction, null when the
    bin got no episode; further keys (e.g. the rest of ``tc.evaluate.summarize``) are allowed.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: not valid JSON ({err})") from None

    def bad(where: str, what: str) -> FileFormatError:
        return FileFormatError(f"{path}: {where}: {what} (schema in docs/ARCHITECTURE.md)")

    if not isinstance(data, dict) or not set(data) <= set(OOD_AXES):
        raise bad("top level", f"expected an object with keys among {OOD_AXES}")
    for axis, bins in data.items():
        if not isinstance(bins, dict):
            raise bad(axis, "expected an object of bins")
        for key, agents in bins.items():
            try:
                float(key)
            except ValueError:
                raise bad(f"{axis}.{key}", "bin keys must be numbers as strings") from None
            if not isinstance(agents, dict) or not set(agents) <= {*OOD_AGENTS, OOD_DIFFERENCE}:
                raise bad(f"{axis}.{key}", f"expected an object with keys among {(*OOD_AGENTS, OOD_DIFFERENCE)}")
            for agent, cell in agents.items():
                if agent == OOD_DIFFERENCE:
                    continue
                ok = isinstance(cell, dict) and isinstance(cell.get("episodes"), int)
                success = cell.get("success_rate") if isinstance(cell, dict) else None
                ok = ok and (success is None or (isinstance(success, (int, float)) and 0 <= success <= 1))
                if not ok:
                    raise bad(f"{axis}.{key}.{agent}", 'expected {"success_rate": 0..1 or null, "episodes": int}')
    return data


def save_figure(fig: plt.Figure, path: str | Path, dpi: int) -> None:
    """Write ``fig`` as PNG atomically (temp file in the same folder, then rename), then close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def _no_data(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_success_vs_frames(histories: dict[str, dict[str, list[float]]]) -> plt.Figure:
    """Fig. 3: validation success (%) vs frames, one line per agent with its 95% interval as a band;
    epochs without validation skipped."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for agent, h in histories.items():
        cis = zip(h.get("val_success_ci_low", []), h.get("val_success_ci_high", []))
        points = [(x, 100 * y) for x, y in zip(h["frames"], h["val_success"]) if not math.isnan(y)]
        bands = [(x, 100 * lo, 100 * hi) for x, (lo, hi) in zip(h["frames"], cis) if not math.isnan(lo)]
        if points:
            color, label = AGENT_COLORS.get(agent), AGENT_LABELS.get(agent, agent)
            ax.plot(*zip(*points), marker="o", label=label, color=color)
            if bands:  # histories written before intervals were recorded have none
                ax.fill_between(*zip(*bands), color=color, alpha=0.15, linewidth=0)
    if ax.lines:
        ax.legend(loc="lower right")
    else:
        _no_data(ax, "no validation results yet")
    ax.set(xlabel="training frames", ylabel="success rate (%)", ylim=(0, 100), title="Validation success vs training frames")
    ax.grid(alpha=0.3)
    return fig


def plot_training_curves(histories: dict[str, dict[str, list[float]]]) -> plt.Figure:
    """Loss, action accuracy and thought accuracy vs frames: one line per agent and matching column."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (pattern, label) in zip(axes, CURVE_PANELS.items()):
        for agent, h in histories.items():
            # Colour = agent, line style = column (e.g. train vs validation accuracy).
            for column, style in zip(sorted(c for c in h if pattern in c), ("-", "--", ":", "-.")):
                points = [(x, y) for x, y in zip(h["frames"], h[column]) if not math.isnan(y)]
                if points:
                    ax.plot(*zip(*points), style, label=f"{agent.upper()} {column}", color=AGENT_COLORS.get(agent))
        if ax.lines:
            ax.legend()
        else:
            _no_data(ax, "no data")
        ax.set(xlabel="training frames", title=label)
        ax.grid(alpha=0.3)
    return fig


def plot_ood(ood: dict | None) -> plt.Figure:
    """Fig. 4(a): success (%) per behavioural and cognitive difficulty bin, grouped bars per agent with
    95% intervals; each tick gives the bin's episode count."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    titles = {"behavioural": "behavioural difficulty (solution length)", "cognitive": "cognitive difficulty"}
    for ax, axis in zip(axes, OOD_AXES):
        bins = sorted((ood or {}).get(axis, {}), key=float)
        agents = [a for a in OOD_AGENTS if any(a in ood[axis][b] for b in bins)]
        width = 0.8 / max(len(agents), 1)
        for i, agent in enumerate(agents):
            cells = [ood[axis][b].get(agent, {}) for b in bins]
            heights = [100 * c["success_rate"] if c.get("success_rate") is not None else 0.0 for c in cells]
            # error bars: the Wilson 95% interval (none for an empty bin or a cell without one)
            errors = [[100 * (c["success_rate"] - c["success_ci_low"]) if c.get("success_ci_low") is not None else 0.0
                       for c in cells],
                      [100 * (c["success_ci_high"] - c["success_rate"]) if c.get("success_ci_high") is not None else 0.0
                       for c in cells]]  # fmt: skip
            xs = [j + (i - (len(agents) - 1) / 2) * width for j in range(len(bins))]
            ax.bar(xs, heights, width, yerr=errors, capsize=2, error_kw={"elinewidth": 0.8},
                   label=AGENT_LABELS[agent], color=AGENT_COLORS[agent])  # fmt: skip
        # the tick says how many episodes the bin holds: its bars mean little when that is small
        counts = [max((ood[axis][b].get(a, {}).get("episodes", 0) for a in agents), default=0) for b in bins]
        labels = [f"{b}+" if axis == "behavioural" and j == len(bins) - 1 else b for j, b in enumerate(bins)]
        ax.set_xticks(range(len(bins)), [f"{label}\nn={n}" for label, n in zip(labels, counts)])
        ax.set(xlabel=titles[axis], ylim=(0, 100), title=f"zero-shot success by {axis} difficulty")
        if not agents:
            _no_data(ax, "no out-of-distribution results yet")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("success rate (%)")
    # One legend under both panels: bars reach 100% and a legend inside would hide them.
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), bbox_to_anchor=(0.5, -0.12))
    return fig


def write_figures(
    histories: dict[str, str | Path], ood_path: str | Path, out_dir: str | Path, dpi: int = 150
) -> dict[str, Path]:
    """Draw every figure into ``out_dir`` from the inputs that exist; returns {figure: path}.

    A missing input gives a figure saying so (the stage's outputs stay the same set of
    files, which DVC expects); a malformed input raises ValueError naming the file.
    """
    loaded = {agent: load_history(p) for agent, p in histories.items() if Path(p).is_file()}
    ood = load_ood(ood_path) if Path(ood_path).is_file() else None
    figures = {
        "success": plot_success_vs_frames(loaded),
        "curves": plot_training_curves(loaded),
        "ood": plot_ood(ood),
    }
    paths = {}
    for name, fig in figures.items():
        paths[name] = Path(out_dir) / FIGURES[name]
        save_figure(fig, paths[name], dpi)
    return paths
