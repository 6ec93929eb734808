"""The SMTP client connection (pipelines/smtp.py) against a real SMTP server (aiosmtpd):
lock-step and pipelined transactions, a refused recipient leaving the connection usable,
dot-stuffing, AUTH PLAIN and LOGIN, a server that hangs up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from pipelines.smtp import SmtpConnection, SmtpDisconnected, SmtpError
from tests.support import free_port


class Recorder:
    """Records the envelopes and commands the server saw; refuses `refused` recipients."""

    def __init__(self, *, pipelining: bool = False, refused: str = "") -> None:
        self.pipelining = pipelining
        self.refused = refused
        self.envelopes: list[tuple[str, list[str], bytes]] = []
        self.resets = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:  # aiosmtpd reads commands in order: it can take them pipelined
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address == self.refused:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.resets += 1
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@asynccontextmanager
async def server(handler: Recorder, **options: Any) -> AsyncIterator[int]:
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


async def connect(port: int, **options: Any) -> SmtpConnection:
    return await SmtpConnection.open("127.0.0.1", port, local_hostname="client.test", **options)


MESSAGE = b"Subject: hi\r\n\r\nfirst line\r\n.starts with a dot\r\n.\r\nlast line\r\n"


@pytest.mark.parametrize("pipelining", [False, True], ids=["lock-step", "pipelined"])
async def test_a_transaction_delivers_the_message_as_it_was(pipelining: bool) -> None:
    handler = Recorder(pipelining=pipelining)
    async with server(handler) as port:
        connection = await connect(port)
        try:
            assert ("PIPELINING" in connection.extensions) is pipelining
            for n in range(3):  # one connection, several transactions
                await connection.send("from@example.com", f"to{n}@example.com", MESSAGE)
        finally:
            await connection.quit()
    assert [(s, r) for s, r, _ in handler.envelopes] == [
        ("from@example.com", [f"to{n}@example.com"]) for n in range(3)
    ]
    # Dot-stuffed on the way, unstuffed by the server: the lines as they were.
    assert handler.envelopes[0][2] == MESSAGE


@pytest.mark.parametrize("pipelining", [False, True], ids=["lock-step", "pipelined"])
async def test_a_refused_recipient_raises_and_the_connection_goes_on(pipelining: bool) -> None:
    handler = Recorder(pipelining=pipelining, refused="nobody@example.com")
    async with server(handler) as port:
        connection = await connect(port)
        try:
            with pytest.raises(SmtpError) as refused:
                await connection.send("from@example.com", "nobody@example.com", MESSAGE)
            assert (refused.value.step, refused.value.code) == ("RCPT TO", 550)
            assert "no such mailbox" in str(refused.value)
            assert handler.resets == 1
            await connection.send("from@example.com", "somebody@example.com", MESSAGE)
        finally:
            await connection.quit()
    assert [r for _, r, _ in handler.envelopes] == [["somebody@example.com"]]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_logs_in_with_plain_or_login(mechanism: str) -> None:
    seen: list[tuple[str, bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, used: str, data: Any) -> AuthResult:
        seen.append((used, data.login, data.password))
        # handled=False: the server answers (235, or 535 when refused) itself.
        return AuthResult(success=data.password == b"s3cret", handled=False)

    handler = Recorder()
    options = {
        "authenticator": authenticator,
        "auth_require_tls": False,
        "auth_exclude_mechanism": [m for m in ("PLAIN", "LOGIN") if m != mechanism],
    }
    async with server(handler, **options) as port:
        connection = await connect(port, username="me", password="s3cret")
        try:
            await connection.send("me@example.com", "you@example.com", MESSAGE)
        finally:
            await connection.quit()
        with pytest.raises(SmtpError) as refused:
            await connect(port, username="me", password="wrong")
        assert refused.value.step == "AUTH"
        assert refused.value.code == 535
    assert seen[0] == (mechanism, b"me", b"s3cret")
    assert len(handler.envelopes) == 1


async def test_a_server_that_hangs_up_is_a_disconnection() -> None:
    handler = Recorder()
    async with server(handler) as port:
        connection = await connect(port)
    # The server stopped: the connection it kept is gone.
    await wait_until(lambda: not connection.is_open)
    with pytest.raises((SmtpDisconnected, ConnectionError)):
        await connection.send("from@example.com", "to@example.com", MESSAGE)
    connection.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline
        await asyncio.sleep(0.05)


async def test_a_server_that_does_not_speak_smtp_is_a_disconnection() -> None:
    async def web_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(web_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(SmtpDisconnected, match=r"not an SMTP reply: 'HTTP/1\.1 400"):
            await connect(port)
    finally:
        server.close()
        await server.wait_closed()


def test_quitting_a_connection_the_server_closed_is_quiet_on_uvloop() -> None:
    """The service runs on uvloop, where writing to a closed transport raises
    RuntimeError (asyncio's loop drops the bytes): the shutdown's QUIT on a connection the
    server had closed raised it out of the pipeline's shutdown hook (the soak's log)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with server(Recorder()) as port:
            connection = await connect(port)
        await wait_until(lambda: not connection.is_open)
        with pytest.raises(SmtpDisconnected):
            await connection.send("from@example.com", "to@example.com", MESSAGE)
        await connection.quit()  # nothing raised

    uvloop.run(scenario())
