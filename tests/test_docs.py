"""The documentation's examples run as written (docs/api.md)."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


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
