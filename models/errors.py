"""The one error type for problems a user must fix (inputs, params, installed files), not bugs.

Stage entry points print an `InputError` as one line naming the problem and the fix; every other
exception is a bug and keeps its traceback. Each subclass also derives from the built-in type it
refines, so `except ValueError` keeps working where it did.
"""


class InputError(Exception):
    """A problem with the user's inputs, params or environment; the message names the fix."""


class ConfigError(InputError, ValueError):
    """A setting that cannot work with this model or data."""


class NonFiniteError(InputError, FloatingPointError):
    """Training or sampling produced NaN/inf: a learning rate or |w| too large, or broken weights."""
