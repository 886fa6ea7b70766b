"""Exception types users can catch. Every user-facing failure raises one of these
with a message that names the offending file, key, shape or value."""
from __future__ import annotations


class SEPSNetError(Exception):
    """Base class of every error sepsnet raises on purpose."""


class ConfigError(SEPSNetError, ValueError):
    """A configuration file or value is invalid."""


class DataError(SEPSNetError):
    """A dataset folder, annotation file or image is missing or malformed."""


class CheckpointError(SEPSNetError):
    """A checkpoint is missing, corrupt, or does not match the config."""


class BundleError(SEPSNetError):
    """An export bundle / manifest is missing, corrupt, or incompatible with this machine."""


class EngineError(SEPSNetError):
    """A backend (ONNX Runtime, TensorRT) cannot be loaded or run."""


class FrameError(SEPSNetError, ValueError):
    """A frame given to the predictor is unusable (wrong shape, dtype, empty, NaN)."""


class NotBuiltError(SEPSNetError):
    """An optional native component (C++/CUDA op, TensorRT plugin) is not available."""


class UsageError(SEPSNetError, ValueError):
    """A command-line argument is unusable: an output path that cannot be written, an unknown or
    absent device, a numeric value out of range."""


class SourceError(SEPSNetError):
    """A frame source (video file, camera, stream, image folder) cannot be opened."""
