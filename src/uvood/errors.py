"""The one exception type of uvood.

Every error raised on bad input is a :class:`UvoodError` (a ``ValueError``), and its
message names the problem and the fix.
"""


class UvoodError(ValueError):
    """Bad input or state, with a message that says what was expected and how to fix it."""
