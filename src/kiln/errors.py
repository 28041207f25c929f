"""The one exception type kiln raises for bad input: the CLI prints its message as one line."""


class KilnError(Exception):
    """A user-facing error: the message names the problem and the fix."""

    # True when the process cannot shut down normally after this error (a collective library's
    # threads still wait on a peer that is gone): the CLI then exits at once after printing.
    hard_exit = False


class PeerLostError(KilnError):
    """Another rank died or stalled past the collective timeout."""

    hard_exit = True
