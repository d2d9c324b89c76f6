"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, process count): a clear message, never a traceback."""


EXIT_USAGE = 2
