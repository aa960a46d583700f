"""The README's two fresh-machine commands are exactly what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.split("## Using it")[0], flags=re.S)
    assert len(blocks) == 2, "the README must start with exactly two commands"
    ci = (ROOT / ".ci" / "run").read_text()
    for command in blocks:
        assert command.strip() in ci, command


def test_bundled_example_keeps_its_licence_notice():
    notice = (ROOT / "src" / "lungsight" / "examples" / "NOTICE").read_text()
    assert "Apache License, Version 2.0" in notice and "TotalSegmentator" in notice
