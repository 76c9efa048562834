"""Errors a user can act on. Each prints as one line; the CLI maps them to exit codes."""


class FarmError(Exception):
    """Base for expected failures; `exit_code` is what the CLI returns."""

    exit_code = 1


class SpecError(FarmError):
    """The job spec (or a file it names) is wrong: nothing was submitted or written."""

    exit_code = 2


class SourceError(SpecError):
    """A model source does not exist, is unreadable, or holds no loadable weights."""


class TrackingError(FarmError):
    """The MLflow tracking server cannot be reached or refused a call."""

    exit_code = 3


class InputChanged(FarmError):
    """A model or text a job planned on changed before (or while) a variant was built from it: the variant is not
    recorded under an identity that is not the one of the bytes it used."""
