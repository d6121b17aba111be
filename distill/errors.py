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


class DataError(DistillError):
    """Data files are there but cannot be used: an image that does not decode, a file that is not an image."""


class CheckpointError(DistillError):
    """A teacher or checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class NonFiniteLossError(DistillError, FloatingPointError):
    """A training loss became NaN or infinite; the message names the step and the loss part."""


class StorageError(DistillError, OSError):
    """A file or folder a run needs cannot be written: no space, no permission, or a file where a folder should be."""


#: errno → what to do about it, for the storage errors the CLI reports in one line
_RESUME = "the last checkpoint written before is intact, so continue with `distill fit --resume RUN_DIR`"
_PERMISSION = "check its permissions, or set --trainer.default_root_dir to a folder you can write"
STORAGE_HINTS = {
    "ENOSPC": f"free some space; {_RESUME}",
    "EDQUOT": f"free some of your quota; {_RESUME}",
    "EACCES": _PERMISSION,
    "EPERM": _PERMISSION,
    "EROFS": "it is on a read-only file system; set --trainer.default_root_dir to a writable folder",
    "ENOTDIR": "a part of its path is a file, not a folder; set --trainer.default_root_dir to a folder",
}


def storage_error(err: OSError) -> StorageError | None:
    """The one-line :class:`StorageError` for an ``OSError`` of :data:`STORAGE_HINTS`, else None."""
    import errno

    name = errno.errorcode.get(err.errno or 0)
    if name not in STORAGE_HINTS:
        return None
    where = err.filename if err.filename is not None else "a file"
    return StorageError(f"cannot write {where}: {err.strerror or name}; {STORAGE_HINTS[name]}.")

