"""The one exception type that reaches the user as a single line.

Raise :class:`UserError` for anything the user can fix (bad input, missing file,
unwritable output). The CLI prints it as ``error: <message>`` on stderr and exits
with code 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An input or environment problem, reported as one ``error:`` line (exit 2)."""
