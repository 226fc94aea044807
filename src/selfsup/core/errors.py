"""The one exception a user mistake raises: the CLI prints its message on one line and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """A bad input: a path, a key, a value. The message says which, and what was expected.

    One raised in a DataLoader worker is rebuilt in the main process from the text of the worker's traceback
    (torch's `ExceptionWrapper.reraise`: "Caught UserError in DataLoader worker process N. Original Traceback
    ..."); its message is cut back to the worker's own, the traceback's last line, so that it stays one line."""

    def __init__(self, message: object = "", *args: object) -> None:
        name = f"{type(self).__module__}.{type(self).__qualname__}: "
        if isinstance(message, str) and message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            message = message.rstrip().rpartition(name)[2]
        super().__init__(message, *args)
