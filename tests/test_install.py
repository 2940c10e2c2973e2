"""A regular (non-editable) install works from any folder: the top-level conf/ ships inside the package.

The project is built and installed with pip into a fresh virtual environment whose only other packages are this
checkout's dependencies (made visible through a .pth file, so nothing is downloaded); then `cil --help`, the
config of a protocol and a short run are asked for from an unrelated folder."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_regular_install_runs_from_an_unrelated_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies (and pip, setuptools) of this checkout's environment; its editable `cil` is not on that
    # path: a .pth file's own .pth files are not processed.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    for folder in ("cil", "conf", "hydra_plugins"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--ignore-installed",
            "--no-index",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args):
        proc = subprocess.run([*args], capture_output=True, text=True, timeout=600, env=env, cwd=elsewhere)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    where = run(str(python), "-c", "import cil, cil.run.cli; print(cil.__file__); print(cil.run.cli.CONF_DIR)")
    assert where.split()[1] == str(site / "cil" / "conf"), where
    assert all(line.startswith(str(site)) for line in where.split()), where  # the installed copy, not the checkout
    usage = run(str(venv / "bin" / "cil"), "--help")
    assert "method: " in usage and "gsa_cifar100" in usage and "split_cifar10_jpeg_native" in usage  # conf/ groups
    job = run(str(python), "-m", "cil", "experiment=gsa_cifar100", "--cfg", "job")
    assert "name: cifar100" in job and "name: gsa" in job and "replay_batch_size: 64" in job
    run(
        str(python),
        "-m",
        "cil",
        "dataset=digits",
        "method=er",
        "buffer.size=50",
        "log.progress=false",
        "eval.anytime_every=0",
        "hydra.run.dir=run",
    )
    results = json.loads((elsewhere / "run" / "results.json").read_text())
    assert results["status"] == "complete" and len(results["acc_matrix"]) == 5
