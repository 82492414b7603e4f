"""The base of every error that is the user's to fix (a bad file, argument or setting).

The `steerlab` command prints such an error as one line (no traceback unless `-v`) and exits with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message says what is wrong and where (file, line, field or argument)."""
