"""The one exception type the CLI turns into a clear message (no traceback) and exit code 2."""


class VclrError(Exception):
    """Bad input or an unmet precondition; the message names the file, line or key."""
