"""`selfsup.errors.UserError`, the public name of `selfsup.core.errors.UserError` (users catch it)."""
from .core.errors import UserError  # noqa: F401
