"""Entry point shared by the stage scripts: expected failures become one clear line, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .params import ParamError


class StageError(RuntimeError):
    """A failure the user can fix (bad input, missing file); the message says how."""


def run_stage(main: Callable[..., None], *args: str) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        main(*args)
    except (ParamError, StageError, FileNotFoundError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
