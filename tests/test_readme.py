"""The README's quick start runs as written and does what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs_and_prunes_exactly(capsys):
    text = README.read_text()
    quick_start = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "Conv2d(3, 61" in printed
    assert re.search(r"\d+ groups together\s+\d+\s+\S+\s+ok", printed)
    macs, params = namespace["macs"], namespace["params"]
    assert macs < 0.5e9 and params < 4e6
