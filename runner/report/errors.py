"""The report's one error type: a clear message for the user, never a stack trace."""


class ReportError(ValueError):
    """Nothing to report (empty selection), or a key / metric / option that does not exist."""
