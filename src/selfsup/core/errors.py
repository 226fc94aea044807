"""The one exception a user mistake raises: the CLI prints its message on one line and exits with code 2."""


class UserError(Exception):
    """A bad input: a path, a key, a value. The message says which, and what was expected."""
