"""Bad input fails at start with one message naming the key, the value and what is allowed: config mistakes
caught by Hydra's schema (in process through Hydra's compose API, and through the CLI), range and combination
checks, corrupt data through the CLI, a resumed run with changed settings, an unreadable checkpoint."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cil.core.methods.gsa import GSAConfig
from cil.errors import ConfigError, DataError
from cil.run.cli import CONF_DIR  # importing the CLI registers the schemas with Hydra
from cil.run.config import default_config, validate
from cil.run.config_errors import describe, unknown_keys
from cil.run.experiment import run_experiment
from cil.schema import RunConfig


def hydra_error(*overrides) -> str:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = compose("config", overrides=list(overrides))
        except Exception as err:  # noqa: BLE001 - the test inspects whatever Hydra raised
            return describe(err)
        with pytest.raises(ConfigError) as info:
            unknown_keys(cfg)
        return str(info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("buffer.size=abc", "buffer.size='abc' is not allowed: buffer.size takes an integer"),
        ("method.iters=1.5", "method.iters=1.5 is not allowed: method.iters takes an integer"),
        ("log.progress=maybe", "log.progress='maybe' is not allowed: log.progress takes true or false"),
        ("optimizer.lr=fast", "optimizer.lr='fast' is not allowed: optimizer.lr takes a number"),
        ("model.hidden=[400,x]", "model.hidden[1]='x' is not allowed: model.hidden takes a list of integers"),
        (
            "dataset.image_size=big",
            "dataset.image_size='big' is not allowed: dataset.image_size takes null or an integer",
        ),
        (
            "stream.n_taks=2",
            "stream.n_taks is not a setting of cil (did you mean stream.n_tasks?): stream takes n_tasks,",
        ),
        ("bogus=1", "bogus is not a setting of cil: top-level keys are dataset, stream,"),
        ("+bogus=1", "bogus is not a setting of cil: top-level keys are dataset, stream,"),
        ("+checkpoint.evry=5", "checkpoint.evry is not a setting of cil (did you mean checkpoint.every?)"),
        ("method=nope", "Could not find 'method/nope'"),
        (  # a launcher option Hydra's config lacks: the fix is Hydra's +, not a cil setting
            "hydra.launcher.additional_parameters.requeue=true",
            "hydra.launcher.additional_parameters is not a key of Hydra's config (or of the chosen launcher's); to "
            "add one, prefix it with +",
        ),
    ],
)
def test_schema_errors_name_key_value_and_what_is_allowed(override, message):
    text = hydra_error(override)
    assert message in text
    assert "Config search path" not in text and "HYDRA_FULL_ERROR" not in text


def test_unknown_group_option_lists_the_available_ones():
    text = hydra_error("method=nope")
    assert all(name in text for name in ("er", "er_ace", "gsa", "naive"))


def cfg_with(**changes) -> RunConfig:
    cfg = default_config("er")
    for key, value in changes.items():
        group, _, name = key.partition("__")
        if name:
            setattr(getattr(cfg, group), name, value)
        else:
            setattr(cfg, group, value)
    return cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stream__batch_size": 0}, "stream.batch_size=0 is not allowed: use an integer >= 1"),
        ({"buffer__size": -1}, "buffer.size=-1 is not allowed: use an integer >= 0"),
        (
            {"buffer__policy": "fifo"},
            "buffer.policy='fifo' is not allowed: choose one of ('reservoir', 'class_balanced')",
        ),
        ({"model__nf": 0}, "model.nf=0 is not allowed: use null or an integer >= 1"),
        ({"model__hidden": [400, 0]}, "model.hidden=[400, 0] is not allowed"),
        ({"optimizer__lr": -0.1}, "optimizer.lr=-0.1 is not allowed: use a learning rate > 0"),
        ({"optimizer__momentum": -0.5}, "optimizer.momentum=-0.5 is not allowed"),
        ({"optimizer__betas": [0.9]}, "optimizer.betas=[0.9] is not allowed: use [beta1, beta2] with 0 <= beta < 1"),
        ({"checkpoint__every": -3}, "checkpoint.every=-3 is not allowed"),
        ({"eval__anytime_every": -1}, "eval.anytime_every=-1 is not allowed"),
        ({"method": GSAConfig(grayscale_p=1.5)}, "method.grayscale_p=1.5 is not allowed: use 0 <= p <= 1"),
        ({"method": GSAConfig(name="er")}, "method.name='er' needs its own config (ERConfig)"),
        ({"precision": "fp8"}, "precision='fp8' is not allowed: choose one of ('fp32', 'bf16', 'fp16', 'auto')"),
        (
            {"buffer__size": 5, "method__replay_batch_size": 10},
            "buffer.size=5 is smaller than method.replay_batch_size=10",
        ),
    ],
)
def test_ranges_and_combinations_are_checked(changes, message):
    with pytest.raises(ConfigError) as info:
        validate(cfg_with(**changes))
    assert message in str(info.value)


def test_split_that_does_not_divide_the_classes_lists_the_divisors(tmp_path):
    with pytest.raises(ConfigError, match=r"stream.n_tasks=3 does not divide the 10 classes .* \[1, 2, 5, 10\]"):
        run_experiment(digits_cfg(stream__n_tasks=3), tmp_path)


# -- resuming with other settings, unreadable checkpoints (in process: a digits run is ~2 s) ---------------------
def digits_cfg(**changes) -> RunConfig:
    cfg = cfg_with(**changes)
    cfg.dataset.name = "digits"
    cfg.log.progress = False
    cfg.buffer.size = 50
    return cfg


def test_resume_refuses_other_settings_and_a_complete_run_is_not_redone(tmp_path):
    cfg = digits_cfg(checkpoint__keep=True)
    first = run_experiment(cfg, tmp_path)
    assert (tmp_path / "checkpoint.pt").exists() and first["status"] == "complete"
    # the same config again: the complete run is returned as it is, nothing recomputed
    again = run_experiment(digits_cfg(checkpoint__keep=True), tmp_path)
    assert again == first
    # other settings: refused, naming the setting, nothing in the folder touched
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"already holds a complete run with other settings \(seed: 0 -> 1\)"):
        run_experiment(digits_cfg(checkpoint__keep=True, seed=1), tmp_path)
    (tmp_path / "results.json").unlink()  # as if killed after the last checkpoint, before results.json
    with pytest.raises(
        ConfigError,
        match=r"checkpoint.pt was written by a run with other settings "
        r"\(buffer.size: 50 -> 60\)",
    ):
        run_experiment(dataclasses.replace(digits_cfg(), buffer=dataclasses.replace(cfg.buffer, size=60)), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "results.json"} == {
        k: v for k, v in before.items() if k != "results.json"
    }
    # checkpoint.* may change: resumed from the final checkpoint, same results
    resumed = run_experiment(digits_cfg(checkpoint__every=7), tmp_path)
    timing = (
        "train_time_s",
        "task_train_time_s",
        "eval_time_s",
        "samples_per_s",
        "wall_time_s",
        "peak_rss_mb",
        "config",
    )
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in first.items() if k not in timing}
    assert not (tmp_path / "checkpoint.pt").exists()  # keep=false now


def test_corrupt_checkpoint_is_named_and_resume_false_starts_over(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02 definitely not a checkpoint")
    with pytest.raises(DataError, match=r"cannot read checkpoint .*checkpoint.pt.*checkpoint.resume=false"):
        run_experiment(digits_cfg(), tmp_path)
    assert run_experiment(digits_cfg(checkpoint__resume=False), tmp_path)["status"] == "complete"


def test_deterministic_switch_sets_torch_and_cublas(monkeypatch):
    from cil.run.determinism import enable_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    try:
        enable_determinism()
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)


# -- through the CLI: the wiring (error: ..., exit 2, no run folder left) -----------------------------------------
def cli(tmp_path, *args, interrupt=None):
    run_dir = tmp_path / "run"
    entry = [str(Path(__file__).parent / "_interrupt_cli.py"), interrupt] if interrupt else ["-m", "cil"]
    proc = subprocess.run(
        [sys.executable, *entry, f"hydra.run.dir={run_dir}", "log.progress=false", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return proc, run_dir


@pytest.mark.slow
def test_cli_config_error_is_one_line_and_exit_2(tmp_path):
    # (tests/test_cli.py runs type errors and unknown keys through the CLI too; this one was silently accepted)
    proc, run_dir = cli(tmp_path, "dataset=digits", "+stream.bogus=1")
    assert proc.returncode == 2, proc.stderr
    assert "error: stream.bogus is not a setting of cil: stream takes n_tasks, batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.fixture
def mnist_copy(tmp_path, shared_data):
    root = tmp_path / "root"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for f in (shared_data / "MNIST" / "raw").glob("*.gz"):
        (root / "MNIST" / "raw" / f.name).write_bytes(
            f.read_bytes()[:10000] if f.name.startswith("train-im") else f.read_bytes()
        )  # the training images cut short
    return root


@pytest.mark.parametrize(
    "verify, message",
    [
        ("true", "error: checksum mismatch for {f}: md5 "),
        (
            "false",
            "error: cannot read {f}: Compressed file ended before the end-of-stream marker was reached; the file "
            "is corrupt or truncated",
        ),
    ],
)
def test_cli_truncated_archive_is_named(tmp_path, cli_in_process, mnist_copy, verify, message):
    f, run_dir = mnist_copy / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", tmp_path / "run"
    proc = cli_in_process(
        f"hydra.run.dir={run_dir}",
        "log.progress=false",
        "dataset=mnist",
        f"dataset.root={mnist_copy}",
        "dataset.download=false",
        f"dataset.verify={verify}",
    )
    assert proc.returncode == 2
    assert message.format(f=f) in proc.stderr
    assert not run_dir.exists()


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "img" / split / c / f"{i}.png")
    return tmp_path / "img"


def test_cli_empty_class_folder_and_unreadable_image_are_named(tmp_path, cli_in_process, image_folder, monkeypatch):
    monkeypatch.setenv("CIL_CACHE_DIR", str(tmp_path / "cache"))
    for f in (image_folder / "train" / "b").iterdir():
        f.unlink()
    run_dir = tmp_path / "run"
    args = (f"hydra.run.dir={run_dir}", "log.progress=false", "dataset=imagefolder", f"dataset.path={image_folder}")
    args += ("stream.n_tasks=1", "buffer.size=10")
    proc = cli_in_process(*args)
    assert proc.returncode == 2
    assert f"error: class folder {image_folder / 'train' / 'b'} has no images" in proc.stderr
    (image_folder / "train" / "b" / "0.png").write_bytes(b"not an image")
    proc = cli_in_process(*args)
    assert proc.returncode == 2
    assert f"error: cannot decode image {image_folder / 'train' / 'b' / '0.png'}" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_cli_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # the weights become NaN in batch 12's update; checkpoints every 5 batches: 5 and 10 written, 15 refused
    proc, run_dir = cli(tmp_path, "dataset=digits", "checkpoint.every=5", "buffer.size=50", interrupt="observe:12:NAN")
    assert proc.returncode == 2, proc.stderr
    assert (
        "error: training diverged: the loss or the weights became non-finite (nan or inf) by stream batch 15"
        in proc.stderr
        and "Lower optimizer.lr" in proc.stderr
    )
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["learner"]["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    import json

    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and "diverged" in res["error"] and res["checkpoint"].endswith("checkpoint.pt")


def test_cli_real_divergence_is_reported(tmp_path, cli_in_process):
    run_dir = tmp_path / "run"
    proc = cli_in_process(
        f"hydra.run.dir={run_dir}", "log.progress=false", "dataset=digits", "optimizer.lr=1e6", "buffer.size=50"
    )
    assert proc.returncode == 2
    assert "non-finite (nan or inf)" in proc.stderr and "Lower optimizer.lr" in proc.stderr
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_takes_bf16_only_where_native_and_bf16_without_it_warns(monkeypatch, caplog, native):
    """On a CPU without AVX512-BF16/AMX, bf16 is emulated (about 7x slower than fp32 on an AMD EPYC): `auto`
    must pick fp32 there, and an explicit bf16 runs as asked but says so."""
    import cil.run.experiment as experiment

    monkeypatch.setattr(experiment, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert experiment.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    with caplog.at_level("WARNING", logger="cil"):
        assert experiment.resolve_precision("bf16", cpu) == "bf16"
        assert experiment.resolve_precision("fp32", cpu) == "fp32"
    assert ("emulates" in caplog.text) is (not native)
