"""The report of a `cil tune` folder: every search trial with its validation score, then the final runs' table.

A tune folder holds tune.json (what ran, the best parameters), search/ (one run folder per trial, scored on the
validation split) and final/ (the best parameters on the test split, one run per seed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from cil.runfolder import find_run_dirs, read_json

TUNE_FILE = "tune.json"


def is_tune_folder(path: Path) -> bool:
    return (Path(path) / TUNE_FILE).is_file()


def _trial_number(run_dir: Path) -> int | None:
    try:
        hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text()) or {}
        return int(hydra["hydra"]["job"]["num"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def trial_rows(search_dir: Path, params: list[str]) -> list[dict]:
    """One row per trial folder: its number, its parameters, its validation score (None unless complete)."""
    rows = []
    for d in find_run_dirs(search_dir):
        res = read_json(d / "results.json") or {}
        failed = read_json(d / "failed.json")
        config = res.get("config") or (failed or {}).get("config") or {}
        status = res.get("status") or ("failed" if failed else "incomplete")
        rows.append(
            {
                "trial": _trial_number(d),
                "params": {p: _value(config, p) for p in params},
                "score": res.get("final_avg_acc") if status == "complete" else None,
                "status": status,
                "split": _value(config, "eval.split"),
            }
        )
    return sorted(rows, key=lambda r: (r["trial"] is None, r["trial"] if r["trial"] is not None else 0))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _status_note(record: dict[str, Any]) -> str:
    """What tune.json says of a tune that has not finished (records from before `status` existed say nothing)."""
    status = record.get("status")
    if status in (None, "complete"):
        return ""
    notes = {
        "searching": "the search has not finished (running, or killed): run the same command again",
        "search stopped": "the search was stopped before all its trials ran (no final phase yet): run the same "
        "command again",
        "search failed": "the search ended without a best setting: see its log",
        "final phase": "the final phase has not finished (running, or killed): run the same command again",
        "final phase stopped": "the final phase was stopped: run the same command again",
    }
    return f" Status: {notes.get(status, status)}."


def tune_text(tune_dir: Path, final_section: str | None) -> str:
    """Markdown: what was searched, the trials (best marked) and the final table (`final_section`, made by the
    report from final/)."""
    record = read_json(Path(tune_dir) / TUNE_FILE) or {}
    best = record.get("best_params") or {}
    params = list(best)
    search_dir = Path(record.get("search_dir") or Path(tune_dir) / "search")
    rows = trial_rows(search_dir, params)
    best_score = max((r["score"] for r in rows if r["score"] is not None), default=None)
    head = ["trial", *params, "validation acc. %", "status"]
    lines = [
        f"### tune: {record.get('search', '?')}",
        f"`{record.get('command', '')}`",
        "",
        f"Search: {len(rows)} trial(s) in `{search_dir}`, scored on the validation split (a held-out part of "
        "the training set; the test set never enters a trial). Best: "
        + (
            f"{record['best_value']:.2f}% with " + ", ".join(f"{k}={_cell(v)}" for k, v in best.items())
            if "best_value" in record
            else "none yet"
        )
        + "."
        + _status_note(record),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        mark = (
            " (best)"
            if r["score"] is not None and best_score is not None and math.isclose(r["score"], best_score)
            else ""
        )
        cells = [
            _cell(r["trial"]),
            *(_cell(r["params"][p]) for p in params),
            (f"{r['score']:.2f}" + mark) if r["score"] is not None else "-",
            r["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    wrong = [r for r in rows if r["split"] not in (None, "validation")]
    if wrong:
        lines += [
            "",
            f"Warning: {len(wrong)} trial(s) were evaluated on eval.split={wrong[0]['split']}, not on the "
            "validation split.",
        ]
    lines += [
        "",
        "Final runs (best parameters, test split):",
        "",
        final_section or f"none yet (`{record.get('final_dir', Path(tune_dir) / 'final')}` holds no run)",
    ]
    return "\n".join(lines)
