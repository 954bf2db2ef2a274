"""reports/summary.md: the pipeline's results in tables, next to the paper's reference numbers.

Inputs (each optional: a missing one is noted in the report, a malformed one raises
ValueError naming it): the training histories and metrics of TC and BC, eval.json,
ood.json (schema in docs/ARCHITECTURE.md) and safety.json. Reference numbers are those
read off the paper's figures (SPEC.md, +-2 points).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tc.history import load_history
from tc.params import FileFormatError, flatten
from tc.plots import FIGURES, OOD_DIFFERENCE, load_ood
from tc.stats import verdict

AGENTS = ("tc", "bc")

# Fig. 3, BossLevel success (%) at 0.25 / 1 / 3 / 5 x 1e8 frames, then final.
PAPER_CURVE = {
    "tc": {"2.5e7": 71, "1e8": 85, "3e8": 89, "5e8": 93, "final": 95},
    "bc": {"2.5e7": 48, "1e8": 54, "3e8": 61, "5e8": 84, "final": 89},
}
PAPER_OTHER = {
    "TC without imitating thoughts (sg_coef 0), final": 53,
    "BabyAI 1.1 imitation learning, 1M demos": 90.4,
}
# Fig. 4(a), zero-shot success (%) of TC / BC per bin; TC with oracle thoughts ~96-100 everywhere.
PAPER_OOD = {
    "behavioural": {"175": (82, 64), "275": (59, 27), "425": (44, 10)},
    "cognitive": {"5": (87, 75), "7": (66, 46), "9": (22, 16)},
}
# Precrime intervention: share (%) of episodes showing the behaviour, without -> with.
PAPER_SAFETY = {
    "touch_red_items": (57.2, 0.16),
    "pickup_balls": (37.1, 0.53),
    "pickup_requested_item": (41.5, 0.08),
}
# params key -> paper value, for the scale table.
PAPER_SCALE = {
    "demos.episodes": 1_000_000,
    "model.memory_dim": 2048,
    "model.instr_dim": 256,
    "train.batch_size": 180,
    "train.recurrence": 80,
    "train.epochs": 160,
    "train.episodes_per_epoch": 51_200,
    "train.warmup_epochs": 5,
    "train.stop_tf": 10,
    "train.sg_coef": 2.0,
    "train.val_episodes": 512,
}


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None/nan as a dash, "|" escaped (regexes)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def rate(value: float | None, low: float | None, high: float | None, n: int | None = None) -> str:
    """A success rate in % with its 95% interval (and episode count): "27.0 [19.3, 36.4] (100)"."""
    if value is None or math.isnan(value):
        return "-" if n is None else f"- ({n})"
    text = f"{100 * value:.1f}" + ("" if low is None or math.isnan(low) else f" [{100 * low:.1f}, {100 * high:.1f}]")
    return text if n is None else f"{text} ({n})"


def difference(d: dict | None) -> str:
    """A paired difference in points with its interval and how to read it: "+1.0 [-8.1, +10.0] no difference"."""
    if d is None:
        return "-"
    return (f"{100 * d['difference']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] "
            f"{verdict(d)}")  # fmt: skip


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_json(path: Path) -> dict | None:
    """A JSON object, None when the file is absent; FileFormatError names a malformed file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: expected a JSON object at the top level")
    return data


def entity_table(data: dict[str, Any], extra: dict[str, dict[str, Any]] | None = None) -> str:
    """Rows = top-level keys (agents, behaviours, ...), columns = their flattened fields.

    ``extra`` adds columns to some rows (e.g. the paper's numbers for a behaviour). Rows of
    unrelated kinds (neither's fields within the other's, e.g. behaviours vs an overall
    score) go to separate tables rather than one mostly empty table.
    """
    rows = {k: flatten(v) if isinstance(v, dict) else {"value": v} for k, v in data.items()}
    for key, fields in (extra or {}).items():
        if key in rows:
            rows[key] = rows[key] | fields
    groups: list[tuple[dict[str, None], list[str]]] = []  # (columns in order, row keys)
    for key, fields in rows.items():
        for columns, members in groups:
            if set(fields) <= set(columns) or set(columns) <= set(fields):
                columns.update(dict.fromkeys(fields))
                members.append(key)
                break
        else:
            groups.append((dict.fromkeys(fields), [key]))
    return "\n\n".join(
        table(["", *columns], [[k, *(rows[k].get(c) for c in columns)] for k in members]) for columns, members in groups
    )


def missing(path: Path) -> str:
    return f"_Not available: `{path}` does not exist (its stage has not run yet)._"


def training_section(metrics_dir: Path, plots_dir: Path, level: str) -> list[str]:
    out = [f"## Training ({level}, validation on fresh seeds; the paper's numbers are BossLevel)"]
    rows, found = [], False
    for agent in AGENTS:
        path = plots_dir / f"train_{agent}.csv"
        if not path.is_file():
            out += ["", missing(path)]
            continue
        h = load_history(path)
        nan = [math.nan] * len(h["frames"])
        vals = [(s, f, lo, hi, n) for s, f, lo, hi, n in zip(h["val_success"], h["frames"],
                                                             h.get("val_success_ci_low", nan),
                                                             h.get("val_success_ci_high", nan),
                                                             h.get("val_episodes", nan)) if not math.isnan(s)]  # fmt: skip
        best = max(vals, default=(math.nan,) * 5, key=lambda v: v[0])
        last = vals[-1] if vals else (math.nan,) * 5
        paper = PAPER_CURVE[agent]
        cell = lambda v: rate(v[0], v[2], v[3], None if math.isnan(v[4]) else int(v[4]))  # noqa: E731
        rows.append([agent.upper(), cell(best), fmt(best[1]), cell(last), fmt(last[1]), paper["final"],
                     " / ".join(str(paper[k]) for k in ("2.5e7", "1e8", "3e8", "5e8"))])  # fmt: skip
        found = True
    if found:
        out += ["", table(["agent", "best val success % [95% CI] (episodes)", "at frames", "last val success %",
                           "at frames", "paper final %", "paper at 2.5e7 / 1e8 / 3e8 / 5e8 frames"], rows)]  # fmt: skip
    out += ["", "Other paper references: " + "; ".join(f"{k}: {v}%" for k, v in PAPER_OTHER.items()) + ".", ""]
    out += [f"![success vs frames](figures/{FIGURES['success']})", f"![training curves](figures/{FIGURES['curves']})"]

    metrics = {agent: load_json(metrics_dir / f"train_{agent}.json") for agent in AGENTS}
    out += ["", "### Training metrics", ""]
    present = {a: m for a, m in metrics.items() if m is not None}
    out += [entity_table(present), ""] if present else []
    out += [line for a in AGENTS if metrics[a] is None for line in (missing(metrics_dir / f"train_{a}.json"), "")]
    return out


def ood_section(path: Path) -> list[str]:
    out = ["## Zero-shot out of distribution (Fig. 4a)", ""]
    ood = load_ood(path) if path.is_file() else None
    if ood is None:
        return out + [missing(path), ""]
    rows = []
    for axis in ("behavioural", "cognitive"):
        for b in sorted(ood.get(axis, {}), key=float):
            cells = ood[axis][b]
            ours = [rate(cells[a]["success_rate"], cells[a].get("success_ci_low"), cells[a].get("success_ci_high"),
                         cells[a]["episodes"]) if a in cells else "-" for a in ("tc", "bc", "oracle")]  # fmt: skip
            paper = PAPER_OOD[axis].get(b, (None, None))
            rows.append([axis, b, *ours, difference(cells.get(OOD_DIFFERENCE)), paper[0], paper[1]])
    out.append(table(["axis", "bin", "TC % [95% CI] (episodes)", "BC %", "TC oracle %", "TC - BC (points, paired)",
                      "paper TC %", "paper BC %"], rows))  # fmt: skip
    out += ["", "Paper: TC with oracle thoughts ~96-100% in every bin.", "", f"![ood](figures/{FIGURES['ood']})", ""]
    return out


def evaluation_section(path: Path) -> list[str]:
    """Headline rates with intervals and the paired differences, then every field of eval.json."""
    data = load_json(path)
    if data is None:
        return ["## Evaluation (test seeds)", "", missing(path), ""]
    modes = {k: v for k, v in data.items() if "success_rate" in v}
    diffs = {k: v for k, v in data.items() if "difference" in v}
    rows = [[m, rate(v["success_rate"], v.get("success_ci_low"), v.get("success_ci_high")), v.get("episodes")]
            for m, v in modes.items()]  # fmt: skip
    out = ["## Evaluation (test seeds)", "", table(["mode", "success % [95% CI]", "episodes"], rows), ""]
    if diffs:
        rows = [[k.replace("_minus_", " - "), difference(d), d["episodes"], d["a_only"], d["b_only"]]
                for k, d in diffs.items()]  # fmt: skip
        out += ["Differences on the same seeds (points, 95% paired interval; \"no difference\" when it holds 0):", "",
                table(["difference", "points [95% CI]", "paired episodes", "only the first solved",
                       "only the second solved"], rows), ""]  # fmt: skip
    return out + ["All fields:", "", entity_table(modes), ""]


def safety_section(path: Path, extra: dict, note: str) -> list[str]:
    """Per behaviour: the share of episodes showing it and the success rate, without -> with the
    intervention, with intervals and the paired change; then every field of safety.json."""
    title = "## Safety: precrime intervention"
    data = load_json(path)
    if data is None:
        return [title, "", missing(path), ""]
    rows = []
    for name, r in data.items():
        if "shown_with" not in r:
            continue
        change = lambda what: {"difference": r[f"{what}_change"], "ci_low": r[f"{what}_change_ci_low"],
                               "ci_high": r[f"{what}_change_ci_high"]}  # fmt: skip  # noqa: E731
        share = lambda key: rate(r.get(key), r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high"))  # noqa: E731
        paper = extra.get(name, {})
        rows.append([name, r.get("episodes"), share("shown_without"), share("shown_with"),
                     difference(change("shown")) if "shown_change" in r else "-", share("halted_with"),
                     share("success_without"), share("success_with"),
                     difference(change("success")) if "success_change" in r else "-",
                     f"{paper.get('paper % without', '-')} -> {paper.get('paper % with', '-')}"])  # fmt: skip
    out = [title, ""]
    if rows:
        out += [table(["behaviour", "episodes", "shown % without [95% CI]", "shown % with", "change (points, paired)",
                       "halted %", "success % without", "success % with", "success change", "paper shown % without -> with"],
                      rows), ""]  # fmt: skip
    return out + [note, "", "All fields:", "", entity_table(data, extra), ""]


def scale_section(params: dict) -> list[str]:
    flat = flatten(params)
    rows = [[key, flat.get(key), paper] for key, paper in PAPER_SCALE.items()]
    return ["## Scale of this run vs the paper", "", table(["param", "this run", "paper"], rows), ""]


def build_report(params: dict, metrics_dir: str | Path, plots_dir: str | Path) -> str:
    """The markdown text of the summary; figure links are relative to reports/."""
    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    safety_ref = "Paper, share of episodes with the behaviour (%), without -> with intervention: " + "; ".join(
        f"{k} {a} -> {b}" for k, (a, b) in PAPER_SAFETY.items()
    )
    # Definitions come from params.yaml: safety.json holds numbers only (it is a DVC metric).
    events = {b.get("name"): {"event": b.get("event")} for b in (params.get("safety") or {}).get("behaviours") or []
              if isinstance(b, dict)}  # fmt: skip
    safety_paper = {k: {"paper % without": a, "paper % with": b} for k, (a, b) in PAPER_SAFETY.items()}
    safety_extra = {k: events.get(k, {}) | safety_paper.get(k, {}) for k in events.keys() | safety_paper.keys()}
    lines = [
        "# Thought Cloning on BabyAI: results",
        "",
        "Generated by `stages/report.py` from the pipeline's outputs. Success rates in % with their Wilson 95%",
        "intervals in brackets; paper numbers are read off its figures (+-2 points) and come from a run ~1000x",
        "larger (see the scale table).",
        "",
        *scale_section(params),
        *training_section(metrics_dir, plots_dir, params.get("demos", {}).get("level", "level unknown")),
        *evaluation_section(metrics_dir / "eval.json"),
        *ood_section(metrics_dir / "ood.json"),
        *safety_section(metrics_dir / "safety.json", safety_extra, safety_ref + "."),
    ]
    return "\n".join(lines).rstrip() + "\n"
