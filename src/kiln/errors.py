"""The one exception type kiln raises for bad input: the CLI prints its message as one line."""


class KilnError(Exception):
    """A user-facing error: the message names the problem and the fix."""
