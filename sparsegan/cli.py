"""Entry point shared by the stage scripts: expected failures become one clear line, not a traceback.

Exit codes: 2 for a failure the user can fix (bad params, a wrong stage argument, missing or
refused input, a diverged training run, an unreachable MLflow store), 130 for Ctrl-C. The message is one
line on stderr; anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable

from .params import ParamError
from .tracking import TrackingError


class StageError(RuntimeError):
    """A failure the user can fix (bad input, missing file); the message says how."""


def one_line(message: object) -> str:
    """``message`` with every run of whitespace that holds a line break turned into one space."""
    return " ".join(str(message).split()) if "\n" in str(message) else str(message)


def usage(main: Callable[..., None], args: tuple[str, ...]) -> str | None:
    """None when ``args`` fit ``main``'s parameters, else the stage's usage line: the script
    runs as ``python stages/<stage>.py <its parameters>`` (what dvc.yaml's cmd passes)."""
    try:
        inspect.signature(main).bind(*args)
        return None
    except TypeError:
        names = " ".join(f"<{p.name}>" if p.default is inspect.Parameter.empty else f"[{p.name}]"
                         for p in inspect.signature(main).parameters.values())
        script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else main.__module__
        return (f"{script} takes {names or 'no arguments'}, got {len(args)} "
                f"argument{'s' * (len(args) != 1)} ({' '.join(args) or 'none'}); the stage "
                f"commands are in dvc.yaml")


def run_stage(main: Callable[..., None], *args: str) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    wrong = usage(main, args)
    if wrong:
        print(f"error: {wrong}", file=sys.stderr)
        sys.exit(2)
    try:
        main(*args)
    except (ParamError, StageError, TrackingError, FileNotFoundError, FloatingPointError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; re-run the stage to continue (training resumes from its last "
              "checkpoint in checkpoints/<model>/s<seed>/)", file=sys.stderr)
        sys.exit(130)
