"""The one exception type users see: its message names the file and the problem, in one line."""


class FervidError(Exception):
    """A user-facing error (bad input file, unknown model, ...). The CLI prints it without a traceback."""


class NotFound(FervidError):
    """The thing named (a job, a track) does not exist: an HTTP API answers 404 rather than 400."""


class Forbidden(FervidError):
    """Refused by policy (a file outside the media roots): an HTTP API answers 403."""
