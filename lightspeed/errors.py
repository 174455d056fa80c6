"""One exception type per kind of user error; every message says how to fix it."""


class LightspeedError(Exception):
    """Base class of every error lightspeed raises for bad input."""


class ModelNotFoundError(LightspeedError, FileNotFoundError):
    """A model path or name that does not resolve to a checkpoint."""


class CheckpointError(LightspeedError):
    """A checkpoint that exists but is corrupt, truncated or inconsistent."""


class UnsupportedModelError(LightspeedError):
    """An architecture, tensor type or option lightspeed does not implement."""


class InvalidRequestError(LightspeedError, ValueError):
    """A prompt or sampling parameter that cannot be served (empty, too long, out of range)."""


class TokenizerMismatchError(LightspeedError):
    """A draft model whose vocabulary differs from the target's."""


class NetworkError(LightspeedError):
    """A download that needs a network this machine does not reach."""


class DistributedError(LightspeedError):
    """A tensor-parallel worker that died, hung past its timeout, or could not start."""
