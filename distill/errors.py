"""User-facing errors.

Anything the user can fix (a wrong name, a missing file, a bad value) raises a subclass of
:class:`DistillError`. The ``distill`` command prints such errors as one line, without a traceback,
and exits with status 2; a traceback means a bug in this package.
"""


class DistillError(Exception):
    """An error in the user's input: the message says what is wrong and how to fix it."""


class ConfigError(DistillError, ValueError):
    """A configuration value is invalid or two values cannot be combined."""


class UnknownNameError(ConfigError, KeyError):
    """A model, data set or preset name is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(DistillError, FileNotFoundError):
    """A data set's files are not where the configuration says they are."""


class CheckpointError(DistillError):
    """A teacher or checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class NonFiniteLossError(DistillError, FloatingPointError):
    """A training loss became NaN or infinite; the message names the step and the loss part."""
