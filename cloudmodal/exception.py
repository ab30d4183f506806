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


# The rest of Modal's tree, so that ported ``except`` clauses and imports keep working. cloudmodal raises the
# ones it has a use for (a sandbox's timeout and termination); the others exist for code that names them.
class InternalError(Error):
    """The control plane failed in a way that is not the caller's doing."""


class ConflictError(InvalidError):
    """The request conflicts with the object's current state."""


class DataLossError(Error):
    """Data was lost or corrupted."""


class ServiceError(Error):
    """The service is unavailable."""


class UnimplementedError(Error):
    """The operation is not implemented."""


class ImageBuildError(RemoteError):
    """An image's set-up failed."""


class WorkspaceManagementError(Error):
    """A workspace operation failed (cloudmodal has one workspace per control plane)."""


class SandboxTimeoutError(TimeoutError):
    """A sandbox ran past its ``timeout`` and was killed."""


class ExecTimeoutError(TimeoutError):
    """A command run in a sandbox ran past its timeout."""


class MountUploadTimeoutError(TimeoutError):
    """Uploading a mount's files took too long."""


class VolumeUploadTimeoutError(TimeoutError):
    """Uploading files to a volume took too long."""


class InteractiveTimeoutError(TimeoutError):
    """An interactive session waited too long."""


class OutputExpiredError(TimeoutError):
    """A call's output is no longer kept."""


class SnapshotCreationError(Error):
    """A memory snapshot could not be made."""


class SandboxTerminatedError(Error):
    """The sandbox was terminated."""


class LogsFetchError(Error):
    """Logs could not be fetched."""


class VersionError(Error):
    """The client's version is not supported by the control plane."""


class InternalFailure(Error):
    """A retryable internal failure."""


class ClientClosed(Error):
    """The client was closed."""


class SandboxFilesystemError(Error):
    """A sandbox file operation failed."""


class SandboxFilesystemNotFoundError(SandboxFilesystemError):
    pass


class SandboxFilesystemDirectoryNotEmptyError(SandboxFilesystemError):
    pass


class SandboxFilesystemIsADirectoryError(SandboxFilesystemError):
    pass


class SandboxFilesystemNotADirectoryError(SandboxFilesystemError):
    pass


class SandboxFilesystemPermissionError(SandboxFilesystemError):
    pass


class SandboxFilesystemFileTooLargeError(SandboxFilesystemError):
    pass


class SandboxFilesystemPathAlreadyExistsError(SandboxFilesystemError):
    pass


class ServerWarning(UserWarning):
    """A warning the control plane sends."""


class AsyncUsageWarning(UserWarning):
    """A blocking call made from an event loop."""


class InternalAPIWarning(UserWarning):
    """An internal API used from user code."""
