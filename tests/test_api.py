"""The Python API (cil.api): configs from dicts or overrides, the same runs as the command line."""

import json
import os
import re
import subprocess
import sys

import pytest

from cil import api
from cil.errors import ConfigError


def test_dicts_become_overrides():
    assert api.overrides(
        {
            "method": {"name": "gsa", "buffer_loss_weight": 1.5},
            "buffer.size": 200,
            "stream": {"class_order": [1, 0, 2]},
            "log": {"progress": False},
            "dataset.root": None,
            "addon": ["mkd", "ccl_dc"],
            "dataset.path": "my data/x",
        }
    ) == [
        "method=gsa",
        "method.buffer_loss_weight=1.5",
        "buffer.size=200",
        "stream.class_order=[1,0,2]",
        "log.progress=false",
        "dataset.root=null",
        "addon=[mkd,ccl_dc]",
        "dataset.path='my data/x'",
    ]
    assert api.overrides(["method=er", "buffer.size=10"]) == ["method=er", "buffer.size=10"]
    with pytest.raises(ConfigError, match="is a string"):
        api.overrides("method=er")


def test_config_is_typed_and_checked():
    cfg = api.config({"experiment": "split_mnist", "method": {"name": "gsa", "buffer_loss_weight": 1.0}})
    assert (cfg.dataset.name, cfg.method.name, cfg.method.buffer_loss_weight, cfg.optimizer.lr) == (
        "mnist",
        "gsa",
        1.0,
        0.1,
    )
    with pytest.raises(ConfigError, match="buffer.sise"):
        api.config({"buffer": {"sise": 3}})
    with pytest.raises(ConfigError, match="method.replay_batch_size"):
        api.config({"method": "er", "method.replay_batch_size": "many"})


@pytest.mark.slow
def test_run_equals_the_command_line_run(tmp_path):
    settings = ["dataset=digits", "method=er_ace", "buffer.size=100", "seed=3", "log.progress=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "cil", *settings, f"hydra.run.dir={tmp_path / 'cli'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    res = api.run(
        {"dataset": "digits", "method": "er_ace", "buffer": {"size": 100}, "seed": 3, "log": {"progress": False}},
        out_dir=tmp_path / "api",
    )
    assert res == json.loads((tmp_path / "api" / "results.json").read_text())
    assert res["acc_matrix"] == cli["acc_matrix"] and res["config"] == cli["config"]
    assert (tmp_path / "api" / ".hydra" / "config.yaml").is_file()
    again = api.run(settings, out_dir=tmp_path / "api")  # complete: returned, not run again
    assert again["wall_time_s"] == res["wall_time_s"]


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"method": None}, "method=None: a config group takes an option's name"),
        ({"addon": None}, "for no add-on: 'none'"),
        ({"dataset": 3}, "dataset=3"),
        (5, "is not a config"),
        ([5], "override 5 is not a string"),
        ({1: "x"}, "config key 1"),
        ({"buffer.size": 100, "buffer": {"size": 200}}, "buffer.size is given twice"),
        (["seed=1", "seed=2"], "seed is given twice"),
    ],
)
def test_every_bad_config_argument_is_a_config_error(cfg, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        api.config(cfg)


@pytest.mark.parametrize("where", ["a_file", "under_a_file", "empty", "not_a_path"])
def test_every_bad_out_dir_is_a_config_error(tmp_path, where):
    (tmp_path / "f").write_text("mine\n")
    out_dir = {"a_file": tmp_path / "f", "under_a_file": tmp_path / "f" / "run", "empty": "", "not_a_path": 5}[where]
    for call in (api.run, api.build):
        with pytest.raises(ConfigError, match="out_dir"):
            call({"dataset": "digits", "log.progress": False}, out_dir=out_dir)
    assert (tmp_path / "f").read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]
