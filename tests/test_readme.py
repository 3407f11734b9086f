"""The README's first command (set up and run Sealtrail on its embedded default) must work
exactly as written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_run_command_works_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    run_it, test_it = blocks[0].strip(), blocks[1].strip()
    assert test_it == "./scripts/test"
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()
    done = subprocess.run(
        ["bash", "-c", "set -e\n" + run_it],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "intact: 1 entries" in done.stdout
    assert "user.email.update" in done.stdout
