"""Every name of Modal's error tree (MODAL_API.md section 11) exists in ``cloudmodal.exception`` with Modal's
parentage, so ported ``except`` clauses and ``from modal.exception import X`` (through ``cloudmodal.compat``) keep
working."""

from __future__ import annotations

import pytest

from cloudmodal import exception as exc

TREE = {
    "AlreadyExistsError": "Error",
    "AuthError": "Error",
    "InternalError": "Error",
    "InvalidError": "Error",
    "ConflictError": "InvalidError",
    "DataLossError": "Error",
    "NotFoundError": "Error",
    "PermissionDeniedError": "Error",
    "ResourceExhaustedError": "Error",
    "ServiceError": "Error",
    "UnimplementedError": "Error",
    "RemoteError": "Error",
    "ImageBuildError": "RemoteError",
    "WorkspaceManagementError": "Error",
    "TimeoutError": "Error",
    "FunctionTimeoutError": "TimeoutError",
    "SandboxTimeoutError": "TimeoutError",
    "ExecTimeoutError": "TimeoutError",
    "MountUploadTimeoutError": "TimeoutError",
    "VolumeUploadTimeoutError": "TimeoutError",
    "InteractiveTimeoutError": "TimeoutError",
    "OutputExpiredError": "TimeoutError",
    "SnapshotCreationError": "Error",
    "SandboxTerminatedError": "Error",
    "LogsFetchError": "Error",
    "ConnectionError": "Error",
    "VersionError": "Error",
    "ExecutionError": "Error",
    "DeserializationError": "Error",
    "SerializationError": "Error",
    "RequestSizeError": "Error",
    "InternalFailure": "Error",
    "ClientClosed": "Error",
    "SandboxFilesystemNotFoundError": "Error",
    "SandboxFilesystemDirectoryNotEmptyError": "Error",
    "SandboxFilesystemIsADirectoryError": "Error",
    "SandboxFilesystemNotADirectoryError": "Error",
    "SandboxFilesystemPermissionError": "Error",
    "SandboxFilesystemFileTooLargeError": "Error",
    "SandboxFilesystemPathAlreadyExistsError": "Error",
}
WARNINGS = ("DeprecationError", "ServerWarning", "AsyncUsageWarning", "InternalAPIWarning")


@pytest.mark.parametrize(("name", "parent"), sorted(TREE.items()))
def test_modals_error_names_exist_with_their_parents(name: str, parent: str) -> None:
    cls = getattr(exc, name)
    assert issubclass(cls, getattr(exc, parent)) and issubclass(cls, exc.Error)


@pytest.mark.parametrize("name", WARNINGS)
def test_modals_warnings_are_user_warnings(name: str) -> None:
    assert issubclass(getattr(exc, name), UserWarning)


def test_input_cancellation_is_not_an_exception() -> None:
    assert issubclass(exc.InputCancellation, BaseException) and not issubclass(
        exc.InputCancellation, Exception
    )


def test_the_sandbox_raises_the_trees_own_classes() -> None:
    from cloudmodal import sandbox

    assert sandbox.SandboxTimeoutError is exc.SandboxTimeoutError
    assert sandbox.SandboxTerminatedError is exc.SandboxTerminatedError
