"""Reading a command-line program's stderr without TensorFlow's native start-up logging."""

from __future__ import annotations

import re
import subprocess

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
