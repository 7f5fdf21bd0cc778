"""Exception types a user can meet. Each message says what happened and what to do.

The CLI prints ``str(error)`` for any :class:`ImagegenError` and exits non-zero
without a traceback; anything else is a bug and keeps its traceback.
"""


class ImagegenError(Exception):
    """Base of every error that is the user's to fix (spec, input, storage, model)."""


class SpecError(ImagegenError):
    """The job spec is invalid: a field is unknown, missing or out of range."""


class InputError(ImagegenError):
    """The prompt table cannot be used as a whole (missing, unreadable, no prompt column)."""


class StorageError(ImagegenError):
    """A storage URL cannot be opened or written."""


class ModelError(ImagegenError):
    """The model reference cannot be resolved or loaded."""


class RunConflict(ImagegenError):
    """Another run holds the output: two runs must not commit into one output at once."""


class ClusterError(ImagegenError):
    """The Ray cluster cannot be reached, or lacks what the spec asks for (GPUs)."""


class LeaseLost(RunConflict):
    """This run's lease on its output ran out or was taken over: it must stop writing."""


class ForeignOutput(StorageError):
    """The output folder holds files imagegen did not write: a run would remove or replace them."""
