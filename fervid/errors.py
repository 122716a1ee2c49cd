"""The one exception type users see: its message names the file and the problem, in one line."""


class FervidError(Exception):
    """A user-facing error (bad input file, unknown model, ...). The CLI prints it without a traceback."""
