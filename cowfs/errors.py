"""Errors meant for people, and the exit codes the CLI turns them into.

Owns the exit-code table (borg's scheme). Never holds tracebacks: an unexpected
exception is a bug and is allowed to surface as one.
"""

EXIT_OK = 0
"""The command did what it was asked; for a backup: the record says complete."""
EXIT_INCOMPLETE = 1
"""The backup ended but is not trustworthy: failed, cancelled or incomplete."""
EXIT_ERROR = 2
"""Bad input or an operation that could not be done; nothing was changed."""
EXIT_INTERRUPTED = 130
"""Waiting was interrupted (Ctrl-C); the job it waited for goes on."""


class CowfsError(Exception):
    """A failure with a reason, printed as one line and turned into an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
