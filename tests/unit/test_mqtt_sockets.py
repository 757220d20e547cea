"""``close_orphaned_sockets``: the sockets a failed connect leaves in its traceback are closed.

paho-mqtt 2.x drops its SSL socket on the floor when the handshake fails; the only references
left are the frames of the exception, which aiomqtt re-raises ``from None``. The broker tests
(tests/security, tests/console) show the real case; this pins the mechanics.
"""

from __future__ import annotations

import socket

import pytest

from asyncmigfra.transport.mqtt import close_orphaned_sockets


class Wrapped(Exception):
    pass


def _connect_and_fail(held: list[socket.socket]) -> None:
    sock, peer = socket.socketpair()
    held.extend((sock, peer))
    peer.close()
    raise ConnectionResetError("handshake failed")


def _client_connect(held: list[socket.socket]) -> None:
    try:
        _connect_and_fail(held)
    except OSError as exc:
        raise Wrapped(str(exc)) from None  # what aiomqtt does


def test_sockets_in_the_context_chain_are_closed() -> None:
    held: list[socket.socket] = []
    with pytest.raises(Wrapped) as caught:
        _client_connect(held)
    assert caught.value.__suppress_context__
    assert close_orphaned_sockets(caught.value) == 1  # ``peer`` was already closed
    assert [s.fileno() for s in held] == [-1, -1]


def test_nothing_to_close_and_cycles_are_harmless() -> None:
    first = ValueError("a")
    second = ValueError("b")
    first.__context__ = second
    second.__context__ = first
    assert close_orphaned_sockets(first) == 0
