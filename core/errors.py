"""The one exception type users see as a clean message instead of a traceback."""


class MatchrtError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""
