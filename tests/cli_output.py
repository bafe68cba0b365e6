"""Running the project's command-line programs, and reading their stderr without TensorFlow's
native start-up logging."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Lines TensorFlow's C++ runtime writes to stderr on import, whatever TF_CPP_MIN_LOG_LEVEL says.
TF_RUNTIME_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] "
    r"|To enable the following instructions: )"
)


def cli_stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The program's own stderr lines (TensorFlow's native start-up logging left out)."""
    return [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not TF_RUNTIME_NOISE.match(line)
    ]


def run_module(
    module: str,
    *args: str,
    timeout_s: float | None = 120,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` from the repository root; its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
