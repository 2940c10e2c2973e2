"""Hyperparameter search on the validation protocol (`cil tune`, eval.split=validation, conf/search/)."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import cil.core.learner as learner_module
from cil import api
from cil.analysis.report import main as report_main
from cil.core.data import LOADERS, load_dataset
from cil.core.data.dataset import holdout_validation
from cil.errors import ConfigError, DataError
from cil.run.cli import CONF_DIR, run_hydra
from cil.run.config import method_schema
from cil.run.tune import main as tune_main

SEARCH_SPACES = sorted(p.stem for p in (Path(CONF_DIR) / "search").glob("*.yaml"))


def test_holdout_keeps_every_class_on_both_sides_and_drops_the_test_set():
    ds = load_dataset("digits")
    val = holdout_validation(ds, 0.1)
    assert len(val.train_y) + len(val.test_y) == len(ds.train_y)
    for c in range(ds.num_classes):
        n = int((ds.train_y == c).sum())
        assert int((val.test_y == c).sum()) == max(1, round(0.1 * n))
        assert int((val.train_y == c).sum()) == n - max(1, round(0.1 * n))
    # the held-out rows and the training rows are disjoint parts of the original training set
    rows = {r.numpy().tobytes() for r in ds.train_x.flatten(1)}
    val_rows = [r.numpy().tobytes() for r in val.test_x.flatten(1)]
    assert all(r in rows for r in val_rows)
    assert torch.equal(holdout_validation(ds, 0.1).test_x, val.test_x)  # one split, whatever the run's seed
    assert not torch.equal(holdout_validation(ds, 0.1, seed=1).test_x, val.test_x)


def test_holdout_refuses_a_class_with_a_single_sample():
    ds = load_dataset("digits")
    keep = torch.ones(len(ds.train_y), dtype=torch.bool)
    keep[torch.nonzero(ds.train_y == 3).squeeze(1)[1:]] = False
    ds.train_x, ds.train_y = ds.train_x[keep], ds.train_y[keep]
    with pytest.raises(DataError, match="too few to hold one out"):
        holdout_validation(ds, 0.1)


def test_validation_split_evaluates_on_held_out_training_rows(tmp_path):
    with api.build(
        {"dataset": "digits", "eval.split": "validation", "log.progress": False}, out_dir=tmp_path
    ) as learner:
        val = holdout_validation(load_dataset("digits"), 0.1)
        assert torch.equal(learner.test_x.cpu(), val.test_x) and torch.equal(learner.test_y.cpu(), val.test_y)
        assert learner.stream.n_samples == len(val.train_y)


@pytest.mark.parametrize("space", SEARCH_SPACES)
def test_search_spaces_compose_and_name_real_keys(space):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"search={space}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.eval.split == "validation"
    assert "Optuna" in cfg.hydra.sweeper._target_ and cfg.hydra.sweeper.direction == "maximize"
    fields = set(method_schema(cfg.method.name).__dataclass_fields__)
    for key in cfg.hydra.sweeper.params:
        group, _, name = key.partition(".")
        assert group in ("optimizer", "method"), key
        if group == "method":
            assert name in fields, f"search={space}: {key} is not a key of method {cfg.method.name}"


@pytest.fixture
def poisoned_digits(monkeypatch):
    """Digits whose test images are all white (no training image is), and a record of every evaluated batch:
    a white image evaluated means the test set was."""
    real = LOADERS["digits"]

    def loader(**kw):
        ds = real(**kw)
        ds.test_x = torch.full_like(ds.test_x, 255)
        return ds

    monkeypatch.setitem(LOADERS, "digits", loader)
    seen = []
    real_predict = learner_module.predict

    def spy(method, x, *args, **kw):
        seen.append(bool((x.flatten(1) == 255).all(1).any()))
        return real_predict(method, x, *args, **kw)

    monkeypatch.setattr(learner_module, "predict", spy)
    return seen


@pytest.mark.slow
def test_tune_searches_on_validation_only_then_runs_the_best_on_test(tmp_path, poisoned_digits, capsys):
    args = [
        "search=er",
        "dataset=digits",
        "log.progress=false",
        "threads=1",
        "buffer.size=100",
        "--trials",
        "3",
        "--seeds",
        "0,1",
        "--dir",
        str(tmp_path / "t"),
    ]
    evaluated = []  # per phase: whether each evaluated batch held a test image

    def phase(argv):
        start = len(poisoned_digits)
        code = run_hydra(argv)
        evaluated.append(poisoned_digits[start:])
        return code

    assert tune_main(args, phase) == 0
    out = tmp_path / "t"
    trials = [json.loads(p.read_text()) for p in sorted((out / "search").glob("*/results.json"))]
    assert len(trials) == 3 and all(t["config"]["eval"]["split"] == "validation" for t in trials)
    record = json.loads((out / "tune.json").read_text())
    # the search evaluated nothing of the test set; the final runs did
    search_evals, final_evals = evaluated
    assert search_evals and not any(search_evals)
    assert any(final_evals)
    # Optuna's best is the trial with the best validation score, and the final runs use its parameters
    best = max(trials, key=lambda t: t["final_avg_acc"])
    assert record["best_value"] == pytest.approx(best["final_avg_acc"])
    assert record["best_params"]["optimizer.lr"] == pytest.approx(best["config"]["optimizer"]["lr"])
    finals = [json.loads(p.read_text()) for p in sorted((out / "final").glob("*/results.json"))]
    assert sorted(f["config"]["seed"] for f in finals) == [0, 1]
    for f in finals:
        assert f["config"]["eval"]["split"] == "test" and f["config"]["method"]["name"] == "er"
        assert f["config"]["optimizer"]["lr"] == pytest.approx(record["best_params"]["optimizer.lr"])
        assert f["config"]["method"]["replay_batch_size"] == record["best_params"]["method.replay_batch_size"]
        assert f["config"]["buffer"]["size"] == 100
    # the report shows the trials (best marked) and the final table
    capsys.readouterr()
    assert report_main([str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("| complete |") == 3 and "(best)" in text and "| digits | er | 100 |" in text
    # the same command again skips every finished trial and run and picks the same best
    mtimes = {p: p.stat().st_mtime for p in out.glob("*/*/results.json")}
    assert tune_main(args, run_hydra) == 0
    assert {p: p.stat().st_mtime for p in out.glob("*/*/results.json")} == mtimes
    assert json.loads((out / "tune.json").read_text())["best_params"] == record["best_params"]


def test_a_search_scored_on_the_test_set_is_refused(tmp_path, capsys):
    code = run_hydra(
        [
            "-m",
            "hydra/sweeper=optuna",
            "dataset=digits",
            "hydra.sweeper.n_trials=1",
            "optimizer.lr=interval(0.01,0.1)",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    assert code == 2
    assert "must not score its trials on the test set" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/results.json"))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["dataset=digits"], "needs a search space"),
        (["search=er", "--trials", "0"], "--trials 0"),
        (["search=er", "--seeds", "a,b"], "--seeds"),
    ],
)
def test_tune_bad_arguments(args, needle, capsys):
    assert tune_main(args, run_hydra) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("eval.split", "train"), ("eval.validation_fraction", 1.5)])
def test_eval_split_settings_are_checked(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        api.run({key: value, "dataset": "digits"}, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_missing_sweeper_plugin_names_the_extra():
    from hydra.errors import MissingConfigException

    from cil.run.config_errors import describe

    err = MissingConfigException("In 'hydra/config': Could not find 'hydra/sweeper/optuna'\nConfig search path: ...")
    assert describe(err) == "optuna is a Hydra plugin that is not installed: pip install 'cil[tune]'"
