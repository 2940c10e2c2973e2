"""The Python API (cil.api): configs from dicts or overrides, the same runs as the command line."""

import json
import os
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
