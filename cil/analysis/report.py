"""Tables from sweep folders: mean +/- std over seeds per experiment, method and memory.

    python -m cil report experiments/runs/split_mnist_fmnist [more folders] [-o DIR]
    python -m cil report tune/<date>/<time>_<search>       # a `cil tune` folder: its trials, then its final table
    python -m cil report --results-md experiments/RESULTS.md experiments/runs/*

Every run folder below the given folders is read: `results.json` (complete), `failed.json` (failed) or only
`.hydra/config.yaml` (incomplete: killed or still running). Runs are grouped by their whole resolved config
except the seed and keys that do not change a result (logging, paths, device), so runs that differ in any other
key are never averaged together; a `variant` column names the keys that tell such groups apart. Seeds expected
in a folder are all seeds that appear in it; a group lacking one reports it as missing.

The first form prints a markdown table and writes summary.md and summary.csv (into the folder when one is given,
else into report/ or -o DIR). The second regenerates the tables of experiments/RESULTS.md (listed in
experiments/tables.yaml) between their markers, keeping everything else in the file.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from cil.analysis.tune_report import is_tune_folder, tune_text
from cil.errors import os_error_text
from cil.runfolder import FAILED, RESULTS, find_run_dirs, read_json, run_status

# Keys that do not change what a run measures: runs differing only in these are the same experiment.
IGNORED_PREFIXES = (
    "seed",
    "dataset.root",
    "dataset.download",
    "dataset.verify",
    "log.",
    "checkpoint.",
    "eval.batch_size",
    "device",
    "compile",
    "channels_last",
    "deterministic",
    "threads",
    "diagnostics.",
)  # diagnostics leave training bit-identical (tests/test_diagnostics.py)
METHOD_ORDER = ["naive", "er", "er_ace", "derpp", "pcr", "ocm", "onpro", "gsa"]
METRICS = [("final_avg_acc", "final acc. %"), ("avg_forgetting", "forgetting %"), ("anytime_acc", "anytime acc. %")]
# Blurry streams' metrics (docs/streams.md): a table shows these columns only when one of its runs has them.
BLURRY_METRICS = [("a_auc", "A_AUC %"), ("a_last", "A_last %")]


# Where the final test errors go (results.json "errors"; runs from before it existed have none).
ERROR_KINDS = [
    ("errors.correct", "correct %"),
    ("errors.within_task", "within task %"),
    ("errors.to_newer_task", "to a newer task %"),
    ("errors.to_older_task", "to an older task %"),
]


def _result(results: dict[str, Any] | None, metric: str) -> Any:
    """results[metric], where a dotted metric ("errors.within_task") reaches into nested dicts."""
    node: Any = results
    for part in metric.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out = {}
        for k, v in cfg.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tuple(cfg) if isinstance(cfg, list) else cfg}


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p) for p in IGNORED_PREFIXES)


@dataclass
class Run:
    path: Path
    status: str  # complete | failed | incomplete
    config: dict
    results: dict | None = None
    error: str | None = None

    @property
    def flat(self) -> dict:
        return flatten(self.config)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def machines_note(runs: list[Run]) -> str:
    """ " Machines: <cpu> (n runs), ..." from results.json `machine` (floats repeat bit for bit on one CPU type
    only, so a table mixing machines says so); "" when no run records one."""
    counts: dict[str, int] = {}
    for r in runs:
        res = r.results or {}
        machine = res.get("machine") or {}
        if machine.get("cpu"):
            on_gpu = machine.get("cuda") and str(res.get("device", "")).startswith("cuda")
            name = f"{machine['cpu']} + {machine['cuda']}" if on_gpu else machine["cpu"]
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return ""
    unknown = sum(r.status == "complete" for r in runs) - sum(counts.values())
    parts = [f"{k} ({v})" for k, v in sorted(counts.items())] + ([f"not recorded ({unknown})"] if unknown else [])
    return " Machines: " + ", ".join(parts) + "."


def load_run(run_dir: Path) -> Run | None:
    """The run in `run_dir`; None (with one warning naming the file) when its results.json cannot be read or is
    not a results.json (not a JSON object, a config that is not one): the table goes on without it."""
    results = run_dir / RESULTS
    if results.exists() and read_json(results) is None:
        try:
            json.loads(results.read_text())
            why = "it is JSON, but not a JSON object as cil writes"
        except OSError as err:
            why = err.strerror or str(err)
        except ValueError as err:
            why = f"not JSON ({err})"
        print(f"warning: skipped {results}: {why}; the table leaves this run out", file=sys.stderr)
        return None
    status = run_status(run_dir)
    if status == "complete":
        res = read_json(results) or {}
        config = res.get("config") or {}
        if not isinstance(config, dict):
            print(f"warning: skipped {results}: its config is not a mapping; the table leaves it out", file=sys.stderr)
            return None
        return Run(run_dir, status, config, results=res)
    if status == "failed":
        info = read_json(run_dir / FAILED) or read_json(run_dir / RESULTS) or {"error_type": "unreadable failed.json"}
        cfg = info.get("config") if isinstance(info.get("config"), dict) else None
        cfg = cfg or _hydra_config(run_dir)
        return Run(run_dir, status, cfg, error=f"{info.get('error_type', '?')}: {info.get('error', '?')}")
    return Run(run_dir, status, _hydra_config(run_dir))


def _hydra_config(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


@dataclass
class Section:
    name: str  # the folder's name; the key of its table in experiments/tables.yaml
    path: Path
    runs: list[Run]


def collect_sections(dirs: list[Path]) -> list[Section]:
    sections = []
    for d in dirs:
        runs = [load_run(r) for r in find_run_dirs(Path(d))]
        sections.append(Section(Path(d).resolve().name, Path(d), [r for r in runs if r is not None]))
    return sections


@dataclass
class Group:
    key: tuple
    name: str  # experiment, else dataset
    method: str
    memory: int
    runs: list[Run] = field(default_factory=list)
    variant: str = ""
    expected_seeds: set = field(default_factory=set)

    @property
    def label(self) -> str:
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def by_seed(self) -> dict:
        """One run per seed: the same experiment and seed in two folders (e.g. `stream.n_tasks=5` spelled out
        in one launch only) counts once, preferring complete, then failed, then the newest."""
        rank = {"complete": 2, "failed": 1, "incomplete": 0}
        best: dict = {}
        for r in self.runs:
            cur = best.get(r.seed)
            if cur is None or (rank[r.status], _mtime(r)) > (rank[cur.status], _mtime(cur)):
                best[r.seed] = r
        return best

    @property
    def duplicates(self) -> list:
        seeds = [r.seed for r in self.runs]
        return sorted({s for s in seeds if seeds.count(s) > 1}, key=str)

    @property
    def complete(self) -> list[Run]:
        return sorted((r for r in self.by_seed.values() if r.status == "complete"), key=lambda r: str(r.seed))

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.by_seed.values() if r.status == "failed"]

    @property
    def n(self) -> int:
        return len(self.complete)

    def values(self, metric: str) -> list[float]:
        vals = [_result(r.results, metric) for r in self.complete]
        return [float(v) for v in vals if v is not None and math.isfinite(float(v))]

    def mean(self, metric: str) -> float | None:
        v = self.values(metric)
        return sum(v) / len(v) if v else None

    def std(self, metric: str) -> float | None:
        """Sample standard deviation over seeds (ddof 1); None with fewer than two seeds."""
        v = self.values(metric)
        if len(v) < 2:
            return None
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))

    @property
    def seeds(self) -> list:
        return sorted({r.seed for r in self.complete}, key=str)

    @property
    def missing_seeds(self) -> list:
        have = set(self.by_seed)
        return sorted(self.expected_seeds - have, key=str)

    @property
    def incomplete(self) -> list[Run]:
        return [r for r in self.by_seed.values() if r.status == "incomplete"]


def _mtime(r: Run) -> float:
    for name in (RESULTS, FAILED, ".hydra/config.yaml"):
        try:
            return (r.path / name).stat().st_mtime
        except OSError:
            pass
    return 0.0


def seed_list(seeds: list) -> str:
    """[0, 1, 2, 4] -> '0-2,4'."""
    if not all(isinstance(s, int) for s in seeds):
        return ",".join(map(str, seeds))
    parts: list[str] = []
    run: list[int] = []
    for s in sorted(seeds):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
        run = [s]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
    return ",".join(parts)


def _order(g: Group) -> tuple:
    base = g.method.split("+")[0]
    m = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (str(g.name), m, g.method, g.memory if isinstance(g.memory, int) else -1, g.variant)


def method_label(flat: dict) -> str:
    """The method's name, with its add-ons when it has any: `gsa+mkd`."""
    addons = sorted({k.split(".")[1] for k in flat if k.startswith("addon.") and k.count(".") >= 2})
    return "+".join([flat.get("method.name") or "?", *addons])


def _schema_defaults(method: str | None) -> dict[str, Any]:
    """Today's defaults of every key a run of `method` has (the run schema's groups and the method's own config)."""
    import dataclasses

    from cil.core.methods import METHODS
    from cil.schema import RunConfig

    out = {k: v for k, v in flatten(dataclasses.asdict(RunConfig())).items() if k != "method"}
    if method in METHODS:
        out.update(flatten({"method": dataclasses.asdict(METHODS[method].Config())}))
    return out


def _normalised(r: Run) -> dict[str, Any]:
    """A run's flat config as today's schema reads it: a key missing from it was added to the schema after the
    run and counts as its default (new keys default to the old behaviour); a method key the method does not
    declare (older runs recorded every method's knobs for every method) is dropped."""
    flat = r.flat
    method = flat.get("method.name")
    defaults = _schema_defaults(method)
    from cil.core.methods import METHODS

    if method in METHODS:
        flat = {k: v for k, v in flat.items() if not k.startswith("method.") or k in defaults}
    return {**defaults, **flat}


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in runs:
        flat = _normalised(r)
        key = tuple(sorted((k, v) for k, v in flat.items() if not _ignored(k)))
        if key not in groups:
            groups[key] = Group(
                key,
                flat.get("experiment") or flat.get("dataset.name") or "?",
                method_label(flat),
                cast(int, flat.get("buffer.size")),  # the schema's defaults are merged in: always an int
            )
        groups[key].runs.append(r)
    # Groups sharing (name, method, memory) differ in some other key: name those keys.
    by_label: dict[tuple, list[Group]] = {}
    for g in groups.values():
        by_label.setdefault((g.name, g.method, g.memory), []).append(g)
    for same in by_label.values():
        if len(same) > 1:
            dicts = [dict(g.key) for g in same]
            keys = sorted({k for d in dicts for k in d if len({repr(x.get(k)) for x in dicts}) > 1})
            for g, d in zip(
                same, dicts, strict=True
            ):  # a key absent from older runs' configs (added to the schema later)
                g.variant = ",".join(f"{k}={d[k]}" if k in d else f"{k}=(absent)" for k in keys)
    seeds = {r.seed for r in runs if r.seed is not None}
    for g in groups.values():
        g.expected_seeds = set(seeds)
    return sorted(groups.values(), key=_order)


# -- tables ----------------------------------------------------------------------------------------------------
def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _problems(g: Group) -> str:
    parts = []
    if g.failed:
        parts.append("failed: " + ", ".join(f"s{r.seed}" for r in sorted(g.failed, key=lambda r: str(r.seed))))
    if g.missing_seeds:
        parts.append("missing: " + ", ".join(f"s{s}" for s in g.missing_seeds))
    if g.incomplete:
        parts.append("incomplete: " + ", ".join(f"s{r.seed}" for r in g.incomplete))
    if g.duplicates:
        parts.append("counted once: " + ", ".join(f"s{s}" for s in g.duplicates) + " (in 2+ folders)")
    return "; ".join(parts)


def summary_rows(section: Section, paper: dict | None = None) -> list[dict]:
    rows = []
    for g in group_runs(section.runs):
        row = {
            "section": section.name,
            "experiment": g.name,
            "method": g.method,
            "memory": g.memory,
            "variant": g.variant,
            "n_seeds": g.n,
            "seeds": seed_list(g.seeds),
            "failed_seeds": " ".join(str(r.seed) for r in g.failed),
            "missing_seeds": " ".join(str(s) for s in g.missing_seeds),
            "incomplete_seeds": " ".join(str(r.seed) for r in g.incomplete),
        }
        for metric, _ in METRICS + BLURRY_METRICS:
            row[f"{metric}_mean"] = g.mean(metric)
            row[f"{metric}_std"] = g.std(metric)
        row["_problems"] = _problems(g)
        row["_errors"] = [f"s{r.seed}: {r.error}" for r in g.failed]
        if paper is not None:
            row["paper"] = _paper_value(paper, g.method, g.memory)
        rows.append(row)
    return rows


def _paper_value(paper: dict, method: str, memory: Any) -> str:
    values = (paper.get("values") or {}).get(method) or {}
    v = values.get(memory, values.get(str(memory)))
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], paper_header: str | None = None) -> str:
    show_variant = any(r["variant"] for r in rows)
    shown = METRICS + [(m, h) for m, h in BLURRY_METRICS if any(r.get(f"{m}_mean") is not None for r in rows)]
    head = (
        ["experiment", "method", "M"]
        + (["variant"] if show_variant else [])
        + [h for _, h in shown]
        + ["n", "seeds", "failed / missing"]
        + ([paper_header] if paper_header else [])
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["experiment"]), r["method"], str(r["memory"])] + ([r["variant"]] if show_variant else [])
        cells += [_fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m, _ in shown]
        cells += [str(r["n_seeds"]), r["seeds"] or "-", r["_problems"] or "-"]
        if paper_header:
            cells.append(r.get("paper") or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors_table(groups: list) -> str | None:
    """Mean ± std over seeds of where the final test samples go, for the groups whose runs recorded it."""
    groups = [g for g in groups if g.values("errors.correct")]
    if not groups:
        return None
    show_variant = any(g.variant for g in groups)
    head = ["experiment", "method", "M"] + (["variant"] if show_variant else []) + [h for _, h in ERROR_KINDS] + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [str(g.name), g.method, str(g.memory)] + ([g.variant] if show_variant else [])
        cells += [_fmt(g.mean(k), g.std(k)) for k, _ in ERROR_KINDS] + [str(len(g.values("errors.correct")))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_FIELDS = (
    [
        "section",
        "experiment",
        "method",
        "memory",
        "variant",
        "n_seeds",
        "seeds",
        "failed_seeds",
        "missing_seeds",
        "incomplete_seeds",
    ]
    + [f"{m}_{s}" for m, _ in METRICS for s in ("mean", "std")]
    + [f"{m}_{s}" for m, _ in BLURRY_METRICS for s in ("mean", "std")]
)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=CSV_FIELDS + (["paper"] if any("paper" in r for r in rows) else []), extrasaction="ignore"
        )
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


def section_text(section: Section, rows: list[dict]) -> str:
    n = {s: sum(r.status == s for r in section.runs) for s in ("complete", "failed", "incomplete")}
    out = [
        f"### {section.name}",
        f"`{section.path}`: {len(section.runs)} run(s), {n['complete']} complete, {n['failed']} failed, "
        f"{n['incomplete']} incomplete. Mean ± sample std over seeds.",
        "",
        markdown_table(rows),
    ]
    errors = [e for r in rows for e in r["_errors"]]
    if errors:
        out += ["", "Failed runs:"] + [f"- {e}" for e in errors]
    return "\n".join(out)


# -- RESULTS.md --------------------------------------------------------------------------------------------------
BEGIN, END = "<!-- cil.report:begin {} -->", "<!-- cil.report:end {} -->"


def load_tables(path: Path) -> dict[str, dict]:
    if not Path(path).exists():
        return {}
    return yaml.safe_load(Path(path).read_text()) or {}


def recorded_command(sweep_dir: Path) -> str | None:
    """The command line of the last launch into a sweep folder (Hydra's multirun.yaml)."""
    path = Path(sweep_dir) / "multirun.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
        ov = cfg["hydra"]["overrides"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    hydra_ov = [o for o in ov.get("hydra") or [] if not o.startswith("hydra.mode=")]
    return " ".join(["python -m cil -m", *hydra_ov, *(ov.get("task") or [])])


def table_block(name: str, spec: dict, section: Section | None) -> str:
    title = spec.get("title", name)
    command = spec.get("command") or f"python -m cil -m sweep={name}"
    lines = [BEGIN.format(name), f"## {title}", ""]
    if spec.get("description"):
        lines += [spec["description"].strip(), ""]
    lines += [f"Sweep: `{command}` (runs in `experiments/runs/{name}/`)."]
    paper = spec.get("paper")
    runs = section.runs if section else []
    if not runs:
        lines += ["", "_No runs recorded yet._"]
        if paper:
            lines += [
                "",
                f"Published ({paper.get('source', 'paper').rstrip('. ')}): "
                + "; ".join(
                    f"{m}: " + ", ".join(f"M={k} {v}" for k, v in vals.items())
                    for m, vals in (paper.get("values") or {}).items()
                ),
            ]
    else:
        assert section is not None  # the runs are its
        rec = recorded_command(section.path)
        if rec and rec != command:
            lines += [f"Last launch into that folder: `{rec}`."]
        rows = summary_rows(section, paper)
        n = {s: sum(r.status == s for r in runs) for s in ("complete", "failed", "incomplete")}
        lines += [
            "",
            f"{len(runs)} run(s): {n['complete']} complete, {n['failed']} failed, {n['incomplete']} "
            f"incomplete. Mean ± sample std over seeds.{machines_note(runs)}",
            "",
            markdown_table(rows, paper_header=paper.get("header", "paper") if paper else None),
        ]
        if paper and paper.get("source"):
            lines += ["", f"Paper column: {paper['source'].rstrip('. ')}."]
        errors_md = errors_table(group_runs(runs)) if spec.get("errors") else None
        if errors_md:
            lines += [
                "",
                "Where the final model's test samples go (percent of all test samples; runs recorded "
                "before results.json had `errors` are not in `n`):",
                "",
                errors_md,
            ]
        errors = [e for r in rows for e in r["_errors"]]
        if errors:
            lines += ["", "Failed runs:"] + [f"- {e}" for e in errors]
    if spec.get("notes"):
        lines += ["", spec["notes"].strip()]
    lines.append(END.format(name))
    return "\n".join(lines)


def update_results_md(path: Path, sections: list[Section], tables: dict[str, dict], command: str) -> str:
    """Replace each table's block between its markers (or append it); text outside the markers is kept."""
    path = Path(path)
    text = (
        path.read_text()
        if path.exists()
        else ("# Results\n\nTables between `cil.analysis.report` markers are generated; edit the prose outside them.\n")
    )
    by_name = {s.name: s for s in sections}
    names = list(tables) + [s.name for s in sections if s.name not in tables]
    for name in names:
        spec = tables.get(name, {"title": name})
        block = table_block(name, spec, by_name.get(name))
        begin, end = BEGIN.format(name), END.format(name)
        i, j = text.find(begin), text.find(end)
        text = (
            text[:i] + block + text[j + len(end) :] if i >= 0 and j > i else text.rstrip("\n") + "\n\n" + block + "\n"
        )
    note_b, note_e = BEGIN.format("command"), END.format("command")
    note = f"{note_b}\n_Tables regenerated by `{command}`._\n{note_e}"
    i, j = text.find(note_b), text.find(note_e)
    text = text[:i] + note + text[j + len(note_e) :] if i >= 0 and j > i else text.rstrip("\n") + "\n\n" + note + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cil report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="*", type=Path, help="sweep folders (or run folders)")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        help="where summary.md / summary.csv go (default: the folder, when one is given, else report/)",
    )
    p.add_argument("--results-md", type=Path, help="regenerate the tables of this RESULTS.md instead")
    p.add_argument("--tables", type=Path, help="table definitions (default: tables.yaml beside RESULTS.md)")
    args = p.parse_args(argv)
    # A shell leaves a glob that matches nothing as it is (experiments/runs/* before any sweep was recorded).
    args.dirs = [
        Path(m)
        for d in args.dirs
        for m in ([d] if d.exists() or not glob.has_magic(str(d)) else sorted(glob.glob(str(d))))
    ]
    if args.results_md and not args.dirs:
        args.dirs = sorted(d for d in (args.results_md.parent / "runs").glob("*") if d.is_dir())
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    sections = collect_sections(args.dirs)
    if args.results_md:
        cmd = f"python -m cil report --results-md {args.results_md} {args.results_md.parent / 'runs'}/*"
        update_results_md(
            args.results_md, sections, load_tables(args.tables or args.results_md.parent / "tables.yaml"), cmd
        )
        print(f"wrote {args.results_md} ({sum(len(s.runs) for s in sections)} runs in {len(sections)} folder(s))")
        return 0
    if not args.dirs:
        p.error("give sweep folders, or --results-md FILE with sweep folders")
    texts, all_rows = [], []
    for s in sections:
        if is_tune_folder(s.path):  # cil tune: the trials, then the final runs
            final = collect_sections([s.path / "final"])[0] if (s.path / "final").is_dir() else None
            rows = summary_rows(final) if final and final.runs else []
            all_rows += rows
            texts.append(tune_text(s.path, section_text(final, rows) if final is not None and rows else None))
            continue
        rows = summary_rows(s)
        all_rows += rows
        texts.append(section_text(s, rows))
    md = "\n\n".join(texts) + "\n"
    print(md, end="")
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path("report"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, ours in (("summary.md", _is_our_summary), ("summary.csv", _is_our_csv)):
            kept = keep_theirs(out / name, ours)
            if kept is not None:
                print(f"note: {out / name} was not written by cil report: it is kept as {kept}", file=sys.stderr)
        (out / "summary.md").write_text(md + MD_MARK + "\n")
        write_csv(all_rows, out / "summary.csv")
    except OSError as err:
        print(f"error: cannot write the summary: {os_error_text(err)} (-o DIR chooses another folder)", file=sys.stderr)
        return 2
    print(f"wrote {out / 'summary.md'} and {out / 'summary.csv'}")
    return 0 if any(s.runs for s in sections) else 1


# The last line of the summary.md cil report writes: a summary.md without it is someone else's and is kept.
MD_MARK = "<!-- written by cil report: the next cil report of this folder rewrites this file -->"


def _is_our_summary(text: str) -> bool:
    return text.rstrip().endswith(MD_MARK)


def _is_our_csv(text: str) -> bool:
    return text.startswith(",".join(CSV_FIELDS[:5]))  # summary.csv's own header


def keep_theirs(path: Path, ours: Any) -> Path | None:
    """Move `path` aside (to `<name>.<n>.bak`) when it exists and `ours(text)` says cil report did not write it;
    the new name, or None when there was nothing to keep."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    if ours(text):
        return None
    n = 1
    while (kept := path.with_name(f"{path.name}.{n}.bak")).exists():
        n += 1
    path.rename(kept)
    return kept


if __name__ == "__main__":
    sys.exit(main())
