"""User-facing errors: one clear line, no traceback."""


class RcpuError(Exception):
    """An error caused by the user's input or environment, reported as one line."""
