"""Errors a user can fix: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Something wrong with the input (a file, a path, a setting), with what to do about it in the message."""


class DataError(UserError):
    """The Fashion-MNIST files are missing, unreachable or damaged."""
