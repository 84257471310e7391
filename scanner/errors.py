"""Errors and exit codes.

Every problem a user can cause (bad model, bad image folder, bad flag) is a :class:`ScannerError`:
the CLI prints its message as one line on stderr and exits with :data:`EXIT_ERROR`.
"""

EXIT_OK = 0
"""Nothing found / passed."""
EXIT_FINDINGS = 1
"""A backdoor was found (or a policy was violated)."""
EXIT_ERROR = 2
"""Bad model, bad input, bad flags."""
EXIT_NOTHING = 3
"""Nothing could be analysed (no supported layer)."""
EXIT_NOT_REMOVED = 4
"""A backdoor was found but NOT removed: the repaired model still answers to it (nothing written unless --always)."""
EXIT_OF_OUTCOME = {"nothing_found": EXIT_OK, "removed": EXIT_FINDINGS, "not_removed": EXIT_NOT_REMOVED}
"""Exit code of a command that writes a model, by the outcome its report states."""


class ScannerError(Exception):
    """A problem with the user's input; the message names the file and the problem."""

    exit_code = EXIT_ERROR

    def __init__(self, message, path=None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class NothingToAnalyse(ScannerError):
    """The model has no layer the scanner can measure."""

    exit_code = EXIT_NOTHING
