"""Entry point shared by the stage scripts: expected failures become one clear line, not a traceback.

Exit codes: 2 for a failure the user can fix (bad params, unknown variant, missing or refused
input, a diverged training run, an unreachable MLflow store), 130 for Ctrl-C. The message is one
line on stderr; anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

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


def run_stage(main: Callable[..., None], *args: str) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        main(*args)
    except (ParamError, StageError, TrackingError, FileNotFoundError, FloatingPointError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; re-run the stage to continue (training resumes from its last "
              "checkpoint in checkpoints/<variant>/)", file=sys.stderr)
        sys.exit(130)
