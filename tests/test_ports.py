"""serve/ports.py: free ports that are never handed out twice, and equal ports named."""
from __future__ import annotations

import socket

from serve import ports
from serve.ports import duplicate_ports, free_port, port_is_free


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The kernel may pick the same port for two binds in a row (CI once got Triton's HTTP and gRPC
    ports equal): free_port skips a port it already returned."""
    picks = iter([1, 1, 1, 2])  # ports no test binds
    monkeypatch.setattr(ports, "_unused_port", lambda host: next(picks))
    monkeypatch.setattr(ports, "_handed_out", set())
    assert [free_port(), free_port()] == [1, 2]


def test_free_port_is_bindable():
    port = free_port()
    assert port_is_free("127.0.0.1", port) and port != free_port()


def test_duplicate_ports_names_each_clash():
    assert duplicate_ports({"--a": 1, "--b": 2, "--c": 1, "--d": 2, "--e": 1}) == [
        "--a and --c are both 1", "--b and --d are both 2", "--a and --e are both 1"]
    assert duplicate_ports({"--a": 1, "--b": 2}) == []


def test_a_listener_takes_a_port_and_time_wait_connections_do_not():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton and uvicorn bind
    srv.bind(("127.0.0.1", free_port()))
    srv.listen()
    port = srv.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = srv.accept()
    assert not port_is_free("127.0.0.1", port)  # listening
    accepted.close()
    srv.close()  # the server closes first (it stopped or died): its side stays in TIME_WAIT
    try:
        assert port_is_free("127.0.0.1", port)  # a restarted server can listen again at once
    finally:
        client.close()
