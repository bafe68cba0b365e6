"""Run a program and SIGKILL it at an exact point: a fault-injection harness for the tests.

    python -m tests.kill_at MODULE.FUNCTION N -- PROGRAM-MODULE ARGS...

replaces MODULE.FUNCTION with a wrapper whose N-th call kills the process with SIGKILL (as
`kill -9` or the OOM killer would: no handler, no cleanup, no flush) before it does anything,
then runs PROGRAM-MODULE as `python -m` would. Nothing in the program knows: the point is
chosen from outside, by the function that would have run next.
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import signal
import sys
from collections.abc import Callable
from typing import Any


def _killing(function: Callable[..., Any], nth: int) -> Callable[..., Any]:
    calls = 0

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth:
            print(f"kill_at: SIGKILL at call {nth} of {function.__qualname__}", file=sys.stderr)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    return wrapper


def main(argv: list[str]) -> None:
    target, nth, separator, program, *rest = argv
    assert separator == "--", "usage: kill_at MODULE.FUNCTION N -- PROGRAM ARGS..."
    module_name, _, name = target.rpartition(".")
    module = importlib.import_module(module_name)
    setattr(module, name, _killing(getattr(module, name), int(nth)))
    sys.argv = [program, *rest]
    runpy.run_module(program, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
