"""The documentation's examples run as written (docs/api.md), and the README matches pyproject."""

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
def test_api_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples write their run folders under runs/
    blocks = python_blocks(DOCS / "api.md")
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "GSA: final average accuracy" in out and "after task 4:" in out and "refused: buffer.sise" in out
    assert (tmp_path / "runs" / "gsa_digits" / "results.json").is_file()
    assert (tmp_path / "runs" / "er_ace_mkd_digits" / "results.json").is_file()


def test_readme_names_every_dependency_and_extra_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    readme = (REPO / "README.md").read_text()
    requirements = readme[readme.index("## Requirements") : readme.index("## Development")]
    names = [re.split(r"[<>=\[ ]", dep)[0] for dep in project["dependencies"]]
    for extra, deps in project["optional-dependencies"].items():
        names += [f"`{extra}`"] + [re.split(r"[<>=\[ ]", dep)[0] for dep in deps]
    missing = [n for n in names if n not in requirements and n.removesuffix("-lib") not in requirements]
    assert not missing, f"README's Requirements does not name {missing} (pyproject.toml has them)"
    assert "kornia" not in requirements  # dropped from the dependencies
