"""Errors a user can cause. Each names the key, file or URL at fault and what was expected."""


class DitscaleError(Exception):
    """Base class: caught by the command line, printed without a traceback; the process exits with `exit_code`."""

    exit_code = 2


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


class LeaseLostError(RunLockedError):
    """This trainer can no longer prove it holds the run dir's lease (another took it over, or it was paused past
    its lease): it wrote nothing more and stopped. The run belongs to the other trainer; nothing to retry."""

    exit_code = 4


class DivergedError(DitscaleError):
    """The loss or gradient norm became NaN or infinite (train.nonfinite): the run stopped at that step, recorded as
    diverged in final.json, with its checkpoints from before that step. Retrying gives the same result."""

    exit_code = 3
