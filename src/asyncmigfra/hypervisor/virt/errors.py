"""Mapping libvirt errors to the project's task errors (:data:`ERROR_TABLE`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Final

import libvirt
from asyncmigfra.errors import (
    ConnectionFailed,
    HypervisorError,
    IncompatibleDestination,
    NotSupported,
    TaskCancelled,
    TaskError,
    TaskTimeout,
    VmNotFound,
    WrongState,
)

#: libvirt error code -> the TaskError it becomes. Anything else is a ``HypervisorError``.
ERROR_TABLE: Final[Mapping[int, type[TaskError]]] = {
    libvirt.VIR_ERR_NO_DOMAIN: VmNotFound,
    libvirt.VIR_ERR_OPERATION_INVALID: WrongState,
    libvirt.VIR_ERR_SYSTEM_ERROR: ConnectionFailed,  # refined by _CONNECTION_DOMAINS
    libvirt.VIR_ERR_RPC: ConnectionFailed,
    libvirt.VIR_ERR_NO_CONNECT: ConnectionFailed,
    libvirt.VIR_ERR_INVALID_CONN: ConnectionFailed,
    libvirt.VIR_ERR_AUTH_FAILED: ConnectionFailed,
    libvirt.VIR_ERR_AUTH_CANCELLED: ConnectionFailed,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE: ConnectionFailed,
    libvirt.VIR_ERR_NO_SUPPORT: NotSupported,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED: NotSupported,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: NotSupported,
    libvirt.VIR_ERR_OPERATION_ABORTED: TaskCancelled,
    libvirt.VIR_ERR_OPERATION_TIMEOUT: TaskTimeout,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: TaskTimeout,
    # "Migration without shared storage is unsafe": refused before anything moved.
    libvirt.VIR_ERR_MIGRATE_UNSAFE: IncompatibleDestination,
}

#: ``VIR_ERR_SYSTEM_ERROR`` is a connection failure only from these error domains (socket,
#: RPC, SSH); from a driver it is an OS error on the host (a file, a device).
_CONNECTION_DOMAINS: Final[frozenset[int]] = frozenset(
    {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_SSH, libvirt.VIR_FROM_LIBSSH}
)

#: Codes whose message is kept bare (the original's lookups threw libvirt's text as is).
_BARE_CODES: Final[frozenset[int]] = frozenset({libvirt.VIR_ERR_NO_DOMAIN})

#: Codes that mean "this driver does not know these flags/this call": worth one more try with
#: fewer flags (the test driver knows almost no flags).
_FLAG_FALLBACK_CODES: Final[frozenset[int]] = frozenset(
    {
        libvirt.VIR_ERR_INVALID_ARG,
        libvirt.VIR_ERR_NO_SUPPORT,
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    }
)


def _code(exc: libvirt.libvirtError) -> int:
    code = exc.get_error_code()
    return int(code) if code is not None else -1


def _message(exc: libvirt.libvirtError) -> str:
    message = exc.get_error_message()
    return str(message) if message else str(exc)


def error_class(exc: libvirt.libvirtError) -> type[TaskError]:
    """The TaskError class for a libvirt error (the table, refined for system errors)."""
    code = _code(exc)
    cls = ERROR_TABLE.get(code, HypervisorError)
    if code == libvirt.VIR_ERR_SYSTEM_ERROR and exc.get_error_domain() not in _CONNECTION_DOMAINS:
        return HypervisorError
    return cls


def translate_error(exc: libvirt.libvirtError, prefix: str = "") -> TaskError:
    """The TaskError for ``exc``: libvirt's message, after ``prefix`` unless the code is bare."""
    message = _message(exc)
    if prefix and _code(exc) not in _BARE_CODES:
        message = prefix + message
    return error_class(exc)(message)


@contextlib.contextmanager
def map_libvirt_errors(prefix: str = "") -> Iterator[None]:
    """Turn a ``libvirtError`` raised inside the block into its TaskError (see the table)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate_error(exc, prefix) from exc


def _wrong_state(state: int) -> WrongState:
    return WrongState(f"Wrong domain state: {state}")
