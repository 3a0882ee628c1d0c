"""User-facing errors: one clear message per bad input, never a traceback as the interface."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (params, files, arguments); the message says what and where."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; print a UserError as one line on stderr and exit with status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
