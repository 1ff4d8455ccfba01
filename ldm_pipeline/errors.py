"""The one exception type that means "the user asked for something we cannot do".

CLIs catch it, print its one-line message to stderr and exit 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (flag, file, model, data): message says what is wrong and how to fix it."""
