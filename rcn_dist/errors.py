"""Errors that end a command with one clear line and a non-zero exit (see cli.main)."""


class RcnError(Exception):
    """A problem the user can fix: bad input, a wrong config, a missing or corrupt file.

    The message is printed as one line, `rcn: error: <message>`, and the process exits with
    `exit_code`. Anything else that escapes is a bug and keeps its traceback.
    """

    exit_code = 2


class RendezvousError(RcnError):
    """The ranks of a job did not all meet (a missing rank, or a stale RANK/WORLD_SIZE in a shell)."""


class DataError(RcnError):
    """A data source, shard or manifest is missing, malformed or corrupt."""


class CheckpointError(RcnError):
    """A checkpoint is missing, incomplete, unsafe or from a different config."""


class UnsafeFileError(RcnError):
    """A file tried to do something a data file must not (code in a pickle, a path escape)."""
