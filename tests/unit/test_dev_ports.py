"""`ctl dev`'s port check: a port whose last connections are in TIME_WAIT is free, a listening one is not."""

from __future__ import annotations

import socket

from controlplane.cli.dev import _port_free


def _time_wait_port() -> int:
    """A loopback port with a connection in TIME_WAIT on the server side (as after `ctl dev` exits)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()          # the server closes first: its side goes to TIME_WAIT
    cli.recv(1)
    cli.close()
    srv.close()
    return int(port)


def test_a_port_in_time_wait_is_free_to_reuse() -> None:
    port = _time_wait_port()
    assert _port_free(port)   # etcd and the gateway bind with SO_REUSEADDR: they can listen here now


def test_a_listening_port_is_not_free() -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not _port_free(s.getsockname()[1])
