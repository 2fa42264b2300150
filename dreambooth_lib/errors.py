"""Errors a user can cause: each names the input at fault and the fix. The CLI prints them as one line, exit 2."""


class DreamboothError(Exception):
    """Base of every user-caused error (bad input, bad config, a precondition not met)."""


class ConfigError(DreamboothError):
    """A configuration field is missing or has a value that is not allowed."""


class StorageError(DreamboothError):
    """A URI cannot be read or written (missing object, bad bucket, no permission)."""


class PreconditionFailed(StorageError):
    """A conditional write lost a race: the object changed since it was read (GCS 412 or local lock)."""


class IngestError(DreamboothError):
    """The subject images are unusable (too few, or a bad file under --strict)."""


class ModelLoadError(DreamboothError):
    """A model URI cannot be loaded (missing files, pickle weights without allow_pickle)."""


class TrainingError(DreamboothError):
    """Training stopped (non-finite loss, incompatible checkpoint)."""


class GateFailed(DreamboothError):
    """The evaluation quality gate rejected the model."""
