"""Errors a user can cause. Each names the key, file or URL at fault and what was expected."""


class DitscaleError(Exception):
    """Base class: caught by the command line, printed without a traceback."""


class ConfigError(DitscaleError, ValueError):
    """A config file, key or override is wrong."""


class WindowSpecError(ConfigError):
    """A window spec ("local@head", "5x6", ...) cannot be parsed or does not fit the model."""


class ModelInputError(DitscaleError, ValueError):
    """A tensor given to the model has the wrong shape, channel count or label range."""


class CheckpointError(DitscaleError):
    """A checkpoint is missing, incomplete, or does not match the model."""


class DataError(DitscaleError):
    """A shard, manifest or source image is missing, corrupt or inconsistent."""


class StorageError(DataError):
    """An object store or URL cannot be reached after retries."""


class LaunchError(DitscaleError):
    """A grid or a submission cannot be planned (bad partition, invalid run config, ...)."""


class RunLockedError(DitscaleError):
    """Another live trainer holds the run dir (or took it over while this one was paused)."""
