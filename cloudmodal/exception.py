"""The error tree users see. Names follow Modal's so ported code keeps its ``except`` clauses."""

from __future__ import annotations


class Error(Exception):
    """Base class of every cloudmodal error."""


class InvalidError(Error):
    """A user-supplied value is invalid; the message says what is wrong and how to fix it."""


class DeprecationError(UserWarning, Error):
    """A removed or renamed option was used; the message names its replacement."""


class NotFoundError(Error):
    """An app, function, call or object does not exist."""


class AlreadyExistsError(Error):
    pass


class AuthError(Error):
    """The control plane refused the credentials."""


class PermissionDeniedError(AuthError):
    """The credentials are valid but do not allow this operation on this object."""


class ConnectionError(Error):  # noqa: A001 - Modal's name
    """The control plane could not be reached."""


class ExecutionError(Error):
    """Something went wrong running the user's code that is not the user's exception itself."""


class RemoteError(Error):
    """An error raised inside a worker that could not be re-raised as its original type."""


class SerializationError(Error):
    """An argument or result could not be pickled."""


class DeserializationError(Error):
    """An argument or result could not be unpickled (often a package missing on one side)."""


class RequestSizeError(Error):
    """A payload is larger than the limit."""


class ResourceExhaustedError(Error):
    pass


class TimeoutError(Error):  # noqa: A001 - Modal's name
    """Base of cloudmodal's timeout errors (``FunctionCall.get`` raises the builtin one, as Modal does)."""


class FunctionTimeoutError(TimeoutError):
    """An input ran longer than its function's ``timeout``."""


class WorkerCrashedError(ExecutionError):
    """The worker process running an input died repeatedly while running it."""


class InputCancellation(BaseException):
    """Raised inside user code when its input is cancelled."""


class NoProviderError(Error):
    """No enabled provider can run a function's resource request."""
