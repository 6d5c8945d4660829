"""The server's connection and body guards, in-process on loopback with short deadlines."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from outlier_runtime.serve.connections import guarded_protocol
from outlier_runtime.serve.guard import BodyGuard, GuardConfig, HostGuard, host_name

from helpers import free_port

HEAD_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
MAX_CONNECTIONS = 8


async def echo_length(scope, receive, send):
    """A tiny ASGI app: answers with the length of the body it got."""
    if scope["type"] != "http":
        return
    message = await receive()
    body = str(len(message.get("body", b""))).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port():
    guard = GuardConfig.for_bind("127.0.0.1", max_body_bytes=1000, body_budget_bytes=10_000,
                                 body_timeout=BODY_TIMEOUT)
    app = HostGuard(BodyGuard(echo_length, guard), guard)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            http=guarded_protocol(MAX_CONNECTIONS, HEAD_TIMEOUT))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(10)


def _request(port: int, raw: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        reply = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return reply
            reply += data
            if b"\r\n\r\n" in reply and reply.split(b"\r\n\r\n", 1)[1]:
                return reply


def _get(port: int) -> bytes:
    return _request(port, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_that_never_finishes_its_head_is_closed(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: local")
        started = time.monotonic()
        assert _closed_by_server(sock, HEAD_TIMEOUT * 6)
        assert time.monotonic() - started < HEAD_TIMEOUT * 6


def test_an_idle_keep_alive_connection_must_send_its_next_head_in_time(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = b""
        while not reply.endswith(b"\r\n\r\n0"):  # the head, and the body: "0" bytes received
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\n")  # then nothing: the keep-alive timer no longer runs
        assert _closed_by_server(sock, HEAD_TIMEOUT * 6)


def test_past_the_cap_the_oldest_idle_connection_makes_room(port):
    idle = []
    for _ in range(MAX_CONNECTIONS * 3):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET / HT")
        idle.append(sock)
    try:
        assert _get(port).startswith(b"HTTP/1.1 200")
        closed = sum(_closed_by_server(sock, 0.05) for sock in idle[:MAX_CONNECTIONS])
        assert closed >= MAX_CONNECTIONS - 1  # the oldest went first
    finally:
        for sock in idle:
            sock.close()


def test_a_body_that_arrives_too_slowly_gets_408(port):
    reply = _request(port, b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nab", timeout=5)
    assert reply.startswith(b"HTTP/1.1 408")


def test_bodies_within_the_limit_reach_the_app(port):
    body = b"x" * 1000
    reply = _request(port, b"POST / HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Length: 1000\r\n"
                           b"Connection: close\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"1000")
    reply = _request(port, b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1001\r\n\r\n" + body + b"x")
    assert reply.startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("value, name", [
    ("[::1]:8000", "::1"), ("LOCALHOST.", "localhost"), ("127.0.0.1:80", "127.0.0.1"), ("::1", "::1"),
])
def test_host_names(value, name):
    assert host_name(value) == name


def test_a_public_bind_checks_hosts_only_when_told_to():
    assert GuardConfig.for_bind("0.0.0.0").host_allowed("anything.example")
    told = GuardConfig.for_bind("0.0.0.0", ["api.example"])
    assert told.host_allowed("api.example:443") and not told.host_allowed("other.example")
    assert not GuardConfig.for_bind("127.0.0.1").host_allowed("evil.example")
    assert not GuardConfig.for_bind("127.0.0.1").host_allowed(None)
