"""The exceptions of ``models``: one small hierarchy, each with a clear message."""


class ModelsError(Exception):
    """Base class of every error raised by ``models``."""


class WeightsNotAvailable(ModelsError):
    """ImageNet base weights were asked for but cannot be found or downloaded."""


class RegistryError(ModelsError):
    """A model version is missing, corrupt or cannot be promoted."""


class DatasetError(ModelsError):
    """A dataset folder or manifest cannot be read or is unusable for training."""


class EvaluationError(ModelsError):
    """Inputs that cannot give honest metrics (one class, empty, NaN, unknown label)."""
