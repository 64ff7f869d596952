"""Exception hierarchy: one root, one subclass per failure domain."""

from __future__ import annotations


class MongarsError(Exception):
    """Root of every error mongarsd raises on purpose."""


class ConfigError(MongarsError):
    """Configuration is invalid; the daemon exits with EX_CONFIG (78)."""


class StoreError(MongarsError):
    """The SQLite store failed or is corrupt; `transient` when retrying can succeed (disk full, busy, restarting)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class UnavailableError(MongarsError):
    """A part of the daemon is disabled by its configuration: 503 with no Retry-After (retrying cannot help)."""


class AuthError(MongarsError):
    """The caller is not authenticated (401) or not allowed (403)."""

    def __init__(self, message: str, *, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class ValidationError(MongarsError):
    """Client input is invalid; `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


class NotFoundError(MongarsError):
    """A named resource (model, memory, token, peer) does not exist."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InferenceError(MongarsError):
    """Generation failed inside the engine."""


class ModelError(InferenceError):
    """A model file is unknown, corrupt or not loadable."""


class UnknownModelError(ModelError):
    """No model of that name is installed (404 naming the models there are)."""


class ContextOverflowError(ValidationError):
    """The prompt does not fit in the model's context window."""

    def __init__(self, message: str, *, param: str | None = "messages", status: int = 400) -> None:
        super().__init__(message, param=param, status=status)


class OverloadedError(MongarsError):
    """Admission control refused the request; retry after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status


class EmbedderUnavailableError(MongarsError):
    """The embedding model is not loaded or failed; recall cannot run.

    `transient` is False when no embedder is configured at all: then retrying cannot help.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class MeshError(MongarsError):
    """The peer mesh failed (membership, forwarding, keys)."""


class WireError(MeshError):
    """A mesh packet or frame is malformed, oversized or unauthenticated."""
