"""`cil report` on synthetic sweep folders: mean and std over seeds, missing/failed/incomplete runs,
groups that must not be averaged together, CSV, and the RESULTS.md regeneration that keeps hand-written text."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from cil.analysis import report

REPO = Path(__file__).resolve().parents[1]


def config(method="er", memory=200, seed=0, experiment="split_mnist", **method_keys):
    return {
        "experiment": experiment,
        "dataset": {"name": "mnist", "root": "/somewhere"},
        "method": {"name": method, "replay_batch_size": 10, **method_keys},
        "buffer": {"size": memory},
        "stream": {"n_tasks": 2, "batch_size": 10},
        "seed": seed,
        "device": "cpu",
        "log": {"progress": False, "tensorboard": False},
    }


def write_run(root: Path, name: str, acc: float, forgetting: float = 10.0, **cfg) -> Path:
    d = root / name
    d.mkdir(parents=True)
    curve = [{"step": 10, "samples": 100, "acc": 90.0}, {"step": 20, "samples": 200, "acc": acc}]
    (d / "results.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "config": config(**cfg),
                "acc_matrix": [[95.0, 0.0], [acc + 5, acc - 5]],
                "final_avg_acc": acc,
                "avg_forgetting": forgetting,
                "anytime_acc": 90.0,
                "anytime_curve": curve,
            }
        )
    )
    return d


def write_failed(root: Path, name: str, **cfg) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "failed.json").write_text(
        json.dumps(
            {
                "status": "failed",
                "error_type": "TrainingError",
                "error": "the training loss became non-finite",
                "config": config(**cfg),
            }
        )
    )
    return d


def write_incomplete(root: Path, name: str, **cfg) -> Path:
    d = root / name / ".hydra"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config(**cfg)))
    return d.parent


@pytest.fixture
def sweep(tmp_path):
    s = tmp_path / "split_mnist_table"
    for seed, acc in enumerate([60.0, 70.0, 80.0]):  # ER M=200: 3 seeds
        write_run(s, f"method=er,seed={seed}", acc, forgetting=10.0 + seed, seed=seed)
    write_run(s, "method=gsa,seed=0", 85.0, method="gsa", seed=0)  # GSA M=200: seed 1 failed, seed 2 missing
    write_failed(s, "method=gsa,seed=1", method="gsa", seed=1)
    write_run(s, "m500,seed=0", 90.0, memory=500, seed=0)  # ER M=500: seed 1 killed, seed 2 missing
    write_incomplete(s, "m500,seed=1", memory=500, seed=1)
    return s


def rows_by(rows, method, memory, variant=""):
    [row] = [r for r in rows if r["method"] == method and r["memory"] == memory and r["variant"] == variant]
    return row


def test_mean_std_and_missing_failed_incomplete(sweep):
    [section] = report.collect_sections([sweep])
    rows = report.summary_rows(section)
    assert [(r["method"], r["memory"]) for r in rows] == [("er", 200), ("er", 500), ("gsa", 200)]
    er = rows_by(rows, "er", 200)
    assert er["n_seeds"] == 3 and er["seeds"] == "0-2"
    assert er["final_avg_acc_mean"] == pytest.approx(70.0)
    assert er["final_avg_acc_std"] == pytest.approx(10.0)  # sample std (ddof 1) of 60, 70, 80
    assert er["avg_forgetting_mean"] == pytest.approx(11.0)
    assert er["failed_seeds"] == "" and er["missing_seeds"] == "" and er["_problems"] == ""
    gsa = rows_by(rows, "gsa", 200)
    assert gsa["n_seeds"] == 1 and gsa["final_avg_acc_mean"] == 85.0 and gsa["final_avg_acc_std"] is None
    assert gsa["failed_seeds"] == "1" and gsa["missing_seeds"] == "2"
    assert gsa["_problems"] == "failed: s1; missing: s2"
    assert any("non-finite" in e for e in gsa["_errors"])
    er500 = rows_by(rows, "er", 500)
    assert er500["n_seeds"] == 1 and er500["_problems"] == "missing: s2; incomplete: s1"

    table = report.markdown_table(rows)
    assert "| split_mnist | er | 200 | 70.00 ± 10.00 | 11.00 ± 1.00 | 90.00 ± 0.00 | 3 | 0-2 | - |" in table
    assert "| split_mnist | gsa | 200 | 85.00 |" in table and "failed: s1; missing: s2" in table


def test_different_configs_are_not_averaged_and_duplicates_count_once(tmp_path):
    s = tmp_path / "ablation"
    write_run(s, "a0", 50.0, method="gsa", seed=0, adaptive_weights=True)
    write_run(s, "a1", 52.0, method="gsa", seed=1, adaptive_weights=True)
    write_run(s, "b0", 40.0, method="gsa", seed=0, adaptive_weights=False)
    write_run(s, "b0-again", 40.0, method="gsa", seed=0, adaptive_weights=False)  # same run, another folder
    # from before the key existed: counts as the schema default (adaptive_weights=True)
    write_run(s, "old2", 45.0, method="gsa", seed=2)
    rows = report.summary_rows(report.collect_sections([s])[0])
    assert len(rows) == 2
    on = rows_by(rows, "gsa", 200, "method.adaptive_weights=True")
    off = rows_by(rows, "gsa", 200, "method.adaptive_weights=False")
    assert on["final_avg_acc_mean"] == pytest.approx(49.0) and on["n_seeds"] == 3
    assert off["n_seeds"] == 1 and "missing: s1, s2" in off["_problems"] and "counted once: s0" in off["_problems"]


def test_cli_prints_and_writes_markdown_and_csv(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(sweep), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "70.00 ± 10.00" in printed and "7 run(s), 5 complete, 1 failed, 1 incomplete" in printed
    assert (out / "summary.md").read_text().startswith("### split_mnist_table")
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["memory"], r["n_seeds"]) for r in rows] == [
        ("er", "200", "3"),
        ("er", "500", "1"),
        ("gsa", "200", "1"),
    ]
    assert math.isclose(float(rows[0]["final_avg_acc_std"]), 10.0)
    assert rows[2]["failed_seeds"] == "1" and rows[2]["missing_seeds"] == "2"
    assert report.main([str(tmp_path / "nope")]) == 2


def test_results_md_regenerated_keeping_prose(sweep, tmp_path):
    tables = {
        "split_mnist_table": {
            "title": "Split MNIST table",
            "command": "python -m cil -m sweep=split_mnist_table",
            "paper": {"header": "paper", "source": "made up", "values": {"er": {200: "61.0"}}},
        },
        "empty_table": {"title": "A table nobody ran yet", "paper": {"source": "GSA", "values": {"gsa": {1000: 31.4}}}},
    }
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# Results\n\nHand-written intro.\n\n<!-- cil.report:begin split_mnist_table -->\nstale table\n"
        "<!-- cil.report:end split_mnist_table -->\n\n## Avalanche parity (hand-written)\nkeep me\n"
    )
    report.update_results_md(md, report.collect_sections([sweep]), tables, "cil report --results-md X")
    text = md.read_text()
    assert "Hand-written intro." in text and "## Avalanche parity (hand-written)\nkeep me" in text
    assert "stale table" not in text
    assert text.index("Hand-written intro.") < text.index("## Split MNIST table") < text.index("## Avalanche parity")
    assert "`python -m cil -m sweep=split_mnist_table`" in text
    assert "| split_mnist | er | 200 | 70.00 ± 10.00 |" in text and "| 61.0 |" in text  # ours beside the paper's
    assert "## A table nobody ran yet" in text and "_No runs recorded yet._" in text and "M=1000 31.4" in text
    # regenerating is idempotent: blocks are replaced, never duplicated
    again = report.update_results_md(md, report.collect_sections([sweep]), tables, "cil report --results-md X")
    assert again == text and text.count("cil.report:begin split_mnist_table") == 1


def test_repository_tables_match_the_sweep_configs():
    """Every table of experiments/tables.yaml has a sweep config writing into experiments/runs/<table>."""
    tables = report.load_tables(REPO / "experiments" / "tables.yaml")
    assert {"split_mnist_er", "split_mnist_methods", "split_fashion_mnist_methods", "split_cifar10_jpeg_500pc"} <= set(
        tables
    )
    conf = REPO / "conf" / "sweep"
    for name in tables:
        sweep_cfg = yaml.safe_load((conf / f"{name}.yaml").read_text())
        assert sweep_cfg["hydra"]["sweep"]["dir"] == f"experiments/runs/{name}"


def test_results_md_cli_before_any_sweep_was_recorded(tmp_path, capsys):
    """`experiments/runs/*` left unexpanded by the shell (no runs yet) still regenerates every table."""
    md = tmp_path / "experiments" / "RESULTS.md"
    md.parent.mkdir()
    md.write_text("# Results\n\nprose\n")
    tables = REPO / "experiments" / "tables.yaml"
    assert (
        report.main(["--results-md", str(md), "--tables", str(tables), str(tmp_path / "experiments" / "runs" / "*")])
        == 0
    )
    text = md.read_text()
    assert text.startswith("# Results\n\nprose\n")
    for name in report.load_tables(tables):
        assert f"<!-- cil.report:begin {name} -->" in text
    assert text.count("_No runs recorded yet._") == len(report.load_tables(tables))


def test_results_json_with_failed_status_counts_as_failed(tmp_path):
    """A run stopped by the learner (e.g. a diverged loss) writes results.json with status "failed"."""
    run = tmp_path / "sec" / "gsa_s0"
    run.mkdir(parents=True)
    cfg = {"experiment": "split_mnist", "seed": 0, "method": {"name": "gsa"}, "buffer": {"size": 200}}
    (run / "results.json").write_text(
        json.dumps({"status": "failed", "error": "loss became non-finite", "config": cfg})
    )
    r = report.load_run(run)
    assert r.status == "failed" and "non-finite" in r.error


def test_errors_breakdown_table_averages_runs_that_recorded_it(tmp_path):
    s = tmp_path / "errors_table"
    for seed, within in enumerate([10.0, 20.0]):
        d = write_run(s, f"er_s{seed}", 70.0, seed=seed)
        res = json.loads((d / "results.json").read_text())
        res["errors"] = {"correct": 70.0, "within_task": within, "to_newer_task": 25.0 - within, "to_older_task": 5.0}
        (d / "results.json").write_text(json.dumps(res))
    write_run(s, "er_s2", 75.0, seed=2)  # recorded before results.json had "errors": not averaged in
    block = report.table_block("errors_table", {"errors": True}, report.collect_sections([s])[0])
    assert "| split_mnist | er | 200 | 70.00 ± 0.00 | 15.00 ± 7.07 | 10.00 ± 7.07 | 5.00 ± 0.00 | 2 |" in block
    assert "to a newer task" not in report.table_block("errors_table", {}, report.collect_sections([s])[0])


def test_runs_with_an_addon_are_their_own_rows_named_after_method_and_addon(tmp_path):
    """A method with an add-on is another row (`er+mkd`), never averaged with the base method's runs, and an
    explicit `addon=none` run is the base method's."""
    root = tmp_path / "addons"
    for seed, acc in enumerate((80.0, 82.0)):
        write_run(root, f"er_s{seed}", acc, seed=seed)
        d = write_run(root, f"er_mkd_s{seed}", acc + 10, seed=seed)
        res = json.loads((d / "results.json").read_text())
        res["config"]["addon"] = {"mkd": {"name": "mkd", "weight": 1.0, "kd_lambda": 5.5}}
        (d / "results.json").write_text(json.dumps(res))
    d = write_run(root, "er_none_s2", 84.0, seed=2)
    res = json.loads((d / "results.json").read_text())
    res["config"]["addon"] = {}
    (d / "results.json").write_text(json.dumps(res))
    rows = report.summary_rows(report.collect_sections([root])[0])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"er", "er+mkd"}
    assert by["er"]["final_avg_acc_mean"] == pytest.approx(82.0) and by["er"]["n_seeds"] == 3
    assert by["er+mkd"]["final_avg_acc_mean"] == pytest.approx(91.0) and by["er+mkd"]["variant"] == ""


def test_a_table_names_the_machines_its_runs_were_recorded_on(tmp_path):
    s = tmp_path / "t"
    for seed, cpu in enumerate(["AMD EPYC", "AMD EPYC", "Intel Xeon"]):
        d = write_run(s, f"seed={seed}", 70.0, seed=seed)
        res = json.loads((d / "results.json").read_text())
        (d / "results.json").write_text(json.dumps({**res, "machine": {"cpu": cpu, "cuda": None}}))
    write_run(s, "seed=3", 70.0, seed=3)  # recorded before results.json had `machine`
    md = tmp_path / "RESULTS.md"
    md.write_text("<!-- cil.report:begin t -->\n<!-- cil.report:end t -->\n")
    report.update_results_md(md, report.collect_sections([s]), {"t": {"title": "T"}}, "cil report")
    assert "Machines: AMD EPYC (2), Intel Xeon (1), not recorded (1)." in md.read_text()
    assert report.machines_note([report.load_run(s / "seed=3")]) == ""


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{not json", '{"status": "complete", "config": [1]}'])
def test_an_unreadable_results_json_is_skipped_with_one_warning(sweep, capsys, content):
    bad = sweep / "method=er,seed=9"
    bad.mkdir()
    (bad / "results.json").write_text(content)
    assert report.main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "70.00 ± 10.00" in out and "7 run(s)" in out  # the table of the others, without the bad one
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(bad / "results.json") in warnings[0]


def test_a_summary_the_user_wrote_is_kept_and_ours_is_rewritten(sweep, capsys):
    (sweep / "summary.md").write_text("# my notes on this sweep\n")
    (sweep / "summary.csv").write_text("a,b\n1,2\n")
    assert report.main([str(sweep)]) == 0
    err = capsys.readouterr().err
    assert f"{sweep / 'summary.md'} was not written by cil report: it is kept as {sweep / 'summary.md.1.bak'}" in err
    assert (sweep / "summary.md.1.bak").read_text() == "# my notes on this sweep\n"
    assert (sweep / "summary.csv.1.bak").read_text() == "a,b\n1,2\n"
    assert (sweep / "summary.md").read_text().startswith("### split_mnist_table")
    assert report.main([str(sweep)]) == 0  # its own files: rewritten, no second copy
    assert "not written by cil report" not in capsys.readouterr().err
    assert sorted(p.name for p in sweep.glob("summary*")) == [
        "summary.csv",
        "summary.csv.1.bak",
        "summary.md",
        "summary.md.1.bak",
    ]


def test_an_output_folder_that_is_a_file_is_one_line(sweep, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine\n")
    assert report.main([str(sweep), "-o", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write the summary") and str(tmp_path / "taken") in err and "\n" not in err
