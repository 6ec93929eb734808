"""One SMTP client connection (RFC 5321): greeting, EHLO, AUTH PLAIN or LOGIN, then mail
transactions, pipelined (RFC 2920) when the server offers it.

Written here rather than taken from aiosmtplib because of what a digest costs: aiosmtplib
spent 350-450 µs of CPU on each (one command, one lock, one timeout and one reply parser
per step, the message flattened again), most of the notifications pipeline's CPU at ten
notifications per digest; this client sends a prepared message in one or two writes and
reads its replies as they come (`bench/smtp.py` measures both). It does what the mailer
needs and no more: plain or implicit TLS (`smtps://`), no STARTTLS."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from dataclasses import dataclass

__all__ = ["SmtpConnection", "SmtpDisconnected", "SmtpError"]


class SmtpError(Exception):
    """The server refused a step: its reply code and text."""

    def __init__(self, step: str, code: int, text: str) -> None:
        super().__init__(f"SMTP {step} refused: {code} {text}")
        self.step = step
        self.code = code
        self.text = text


class SmtpDisconnected(ConnectionError):
    """The connection closed under us (the server dropped it, e.g. while idle), or what
    came back is not SMTP."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str


class SmtpConnection:
    """An open, greeted (and logged in) connection; `send` runs one mail transaction."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        local_hostname: str,
        use_tls: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> SmtpConnection:
        """Connect, read the greeting, say EHLO (HELO to a server that refuses it) and
        log in when a username is given."""
        context = ssl.create_default_context() if use_tls else None
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host if use_tls else None
            )
        connection = cls(reader, writer, timeout)
        try:
            async with asyncio.timeout(timeout):
                await connection._handshake(local_hostname, username, password)
        except BaseException:
            connection.close()
            raise
        return connection

    @property
    def is_open(self) -> bool:
        return not self._writer.is_closing() and not self._reader.at_eof()

    async def send(self, sender: str, recipient: str, data: bytes) -> None:
        """One transaction: `data` (an RFC 5322 message) from `sender` to `recipient`.
        A refused step raises `SmtpError` and leaves the connection usable (RSET)."""
        options = " SMTPUTF8" if not (sender.isascii() and recipient.isascii()) else ""
        commands = (f"MAIL FROM:<{sender}>{options}", f"RCPT TO:<{recipient}>", "DATA")
        steps = ("MAIL FROM", "RCPT TO", "DATA")
        expected = (250, 250, 354)
        async with asyncio.timeout(self.timeout):
            if "PIPELINING" in self.extensions:
                self._write(*commands)
                replies = [await self._reply() for _ in commands]
            else:
                replies = []
                for command, code in zip(commands, expected, strict=True):
                    self._write(command)
                    replies.append(await self._reply())
                    if replies[-1].code != code:
                        break
            for step, code, reply in zip(steps, expected, replies, strict=False):
                if reply.code != code and not (step == "RCPT TO" and reply.code == 251):
                    await self._reset(replies)
                    raise SmtpError(step, reply.code, reply.text)
            self._writer.write(_dot_stuffed(data))
            await self._expect("message", 250)

    async def quit(self) -> None:
        """Say goodbye and close; a server already gone is no error here."""
        try:
            async with asyncio.timeout(self.timeout):
                self._write("QUIT")
                await self._reply()
        except (OSError, SmtpDisconnected, TimeoutError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._writer.close()

    async def _handshake(self, local_hostname: str, username: str | None, pw: str | None) -> None:
        await self._expect("greeting", 220)
        self._write(f"EHLO {local_hostname}")
        hello = await self._reply()
        if hello.code == 250:
            self.extensions = _extensions(hello.text)
        else:
            self._write(f"HELO {local_hostname}")
            await self._expect("HELO", 250)
        if username is not None:
            await self._login(username, pw or "")

    async def _login(self, username: str, password: str) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            credentials = _b64("\0" + username + "\0" + password)
            self._write(f"AUTH PLAIN {credentials}")
            await self._expect("AUTH", 235)
        elif "LOGIN" in mechanisms:
            self._write("AUTH LOGIN")
            await self._expect("AUTH", 334)
            self._write(_b64(username))
            await self._expect("AUTH", 334)
            self._write(_b64(password))
            await self._expect("AUTH", 235)
        else:
            raise SmtpError("AUTH", 504, f"the server offers no PLAIN or LOGIN: {mechanisms}")

    async def _reset(self, replies: list[Reply]) -> None:
        """After a refused envelope: end a DATA the server accepted anyway (with one
        recipient refused, it has none, and refuses the empty message), then RSET."""
        if replies[-1].code == 354:
            self._writer.write(b".\r\n")
            await self._reply()
        self._write("RSET")
        await self._reply()

    def _write(self, *commands: str) -> None:
        self._writer.write("".join(f"{c}\r\n" for c in commands).encode())

    async def _expect(self, step: str, code: int) -> Reply:
        reply = await self._reply()
        if reply.code != code:
            raise SmtpError(step, reply.code, reply.text)
        return reply

    async def _reply(self) -> Reply:
        """One reply, its lines joined (`250-first`, `250 last`)."""
        lines: list[str] = []
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                raise SmtpDisconnected("the SMTP server closed the connection") from exc
            except asyncio.LimitOverrunError as exc:
                raise SmtpDisconnected("the SMTP server sent an overlong line") from exc
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit():
                raise SmtpDisconnected(f"not an SMTP reply: {text[:200]!r}")
            lines.append(text[4:])
            if text[3:4] != "-":
                return Reply(int(text[:3]), "\n".join(lines))


def _extensions(ehlo: str) -> dict[str, str]:
    """The EHLO reply's keywords (after the greeting line) and their parameters."""
    found: dict[str, str] = {}
    for line in ehlo.split("\n")[1:]:
        keyword, _, parameters = line.partition(" ")
        found[keyword.upper()] = parameters
    return found


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def _dot_stuffed(data: bytes) -> bytes:
    """The message as DATA carries it: CRLF line ends, a leading dot doubled, the end
    marker after a final line end."""
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = _LINE_ENDS.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"
