"""Running the ``sealtrail`` command line in-process in tests, and its error contract."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealtrail.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``sealtrail ARGS``."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def init_home(tmp_path: Path, capsys: pytest.CaptureFixture[str], origin: str) -> Path:
    """A new home made by ``sealtrail init`` (its output swallowed)."""
    home = tmp_path / "home"
    assert main(["--home", str(home), "init", "--origin", origin]) == 0
    capsys.readouterr()
    return home


def one_line_error(err: str) -> None:
    """Errors are one line on stderr, never a traceback."""
    assert "Traceback" not in err
    assert err.startswith("sealtrail: ")
    assert err.count("\n") == 1, err


@contextlib.contextmanager
def daemon(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``sealtrail ARGS`` as a process of its own (killed if the test fails early)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sealtrail.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM a daemon; its stderr, once it has exited 0 without a traceback."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    text = err.decode()
    assert "Traceback" not in text
    return text
