"""Mail: the digest email of a batch of notifications and the report of an upload, sent
over SMTP or written to an outbox directory as .eml files."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import Sequence
from email.charset import QP, Charset
from email.message import EmailMessage, Message
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import make_msgid
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib

from ingest.service.settings import Settings
from pipelines.payloads import Notification

# A larger errors CSV stays on the server (GET /uploads/<id>/errors.csv): mail servers
# commonly refuse messages over 10-25 MB.
ATTACHMENT_MAX_BYTES = 5 * 1024 * 1024


class Mailer(Protocol):
    async def send(self, message: Message) -> None: ...

    async def close(self) -> None: ...


def mailer_for(settings: Settings, connections: int = 1) -> Mailer:
    """SMTP when INGEST_SMTP_URL is set (keeping up to `connections` open), else the
    outbox directory."""
    if settings.smtp_url is not None:
        return SmtpMailer(settings.smtp_url.get_secret_value(), connections=connections)
    return OutboxMailer(settings.mail_outbox)


def digest(
    sender: str,
    recipient: str,
    notifications: Sequence[tuple[str, Notification]],
    message_id: str | None = None,
) -> Message:
    """One email listing every notification of a batch, each with its message id, under
    `message_id` (`window_message_id`: the same for every attempt of a window) or a new
    one.

    Built with the email package's compat32 API: the modern `EmailMessage` parses every
    header it is given, which took 550 µs a digest against 85 here (a fifth of the
    notifications pipeline's CPU when digests are small)."""
    count = len(notifications)
    lines = [
        f"Hello {recipient},",
        "",
        f"{count} update{'s' if count != 1 else ''} on your bookings:",
        "",
    ]
    for message_id, notification in notifications:
        event = notification.details.get("event")
        what = f"your {event} ticket is booked" if event else f"{notification.type} notification"
        lines.append(f"- {what} (ref {message_id})")
    text = "\n".join([*lines, "", "-- ingest tickets", ""])
    # Plain 7-bit text when it is ASCII, else UTF-8 in quoted-printable (readable).
    message = MIMENonMultipart("text", "plain")
    message.set_payload(text, "us-ascii" if text.isascii() else _UTF8_QUOTED_PRINTABLE)
    message["From"] = sender
    message["To"] = recipient  # non-ASCII headers are encoded (RFC 2047) when sent
    message["Subject"] = f"Your {count} ticket notification{'s' if count != 1 else ''}"
    message["Message-ID"] = message_id or make_msgid(domain=sender.rpartition("@")[2] or None)
    return message


def window_message_id(window: str, sender: str) -> str:
    """The Message-ID of a durable window's digest: derived from the window, so a digest
    sent again (a crash between the mail server's acceptance and the window's completion)
    is the same email, which mail clients show once."""
    domain = sender.rpartition("@")[2] or "ingest.local"
    return f"<digest.{_SAFE_ID.sub('-', window)}@{domain}>"


_SAFE_ID = re.compile(r"[^A-Za-z0-9.-]")


def upload_report(
    sender: str,
    recipient: str,
    summary: list[str],
    subject: str,
    errors: tuple[Path, str] | None,
) -> EmailMessage:
    """The email ending an upload: its summary and, when rows failed, the errors CSV
    (`line,row,reason`; a path and the name to attach it under)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    body = [f"Hello {recipient},", "", *summary]
    if errors is not None and errors[0].stat().st_size > ATTACHMENT_MAX_BYTES:
        body += ["", "The errors CSV is too large to attach; it is kept on the server."]
        errors = None
    message.set_content("\n".join([*body, "", "-- ingest tickets", ""]))
    if errors is not None:
        path, name = errors
        message.add_attachment(path.read_bytes(), maintype="text", subtype="csv", filename=name)
    return message


_UTF8_QUOTED_PRINTABLE = Charset("utf-8")
_UTF8_QUOTED_PRINTABLE.body_encoding = QP


class SmtpMailer:
    """Sends over SMTP: `smtp://[user:password@]host[:port]`, or `smtps://` for TLS.

    Connections are kept open and reused, one per send under way (at most `connections`
    kept idle): a new connection costs a TCP handshake, EHLO, TLS and login, more than the
    email itself. One the server closed while idle is found on use, and the email goes
    once more over a new connection."""

    def __init__(self, url: str, timeout: float = 30.0, connections: int = 5) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("INGEST_SMTP_URL must look like smtp://user:password@host:port")
        self.hostname = parts.hostname
        self.use_tls = parts.scheme == "smtps"
        self.port = parts.port or (465 if self.use_tls else 25)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.timeout = timeout
        self.connections = connections
        self._idle: list[aiosmtplib.SMTP] = []
        self._local_hostname: str | None = None

    async def send(self, message: Message) -> None:
        client = self._idle.pop() if self._idle else None
        try:
            if client is None or not client.is_connected:
                client = await self._connect()
            try:
                await self._send(client, message)
            except aiosmtplib.SMTPServerDisconnected:
                client = await self._connect()
                await self._send(client, message)
        except BaseException:
            if client is not None:
                client.close()
            raise
        if len(self._idle) < self.connections:
            self._idle.append(client)
        else:
            await _quit(client)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await _quit(client)

    @staticmethod
    async def _send(client: aiosmtplib.SMTP, message: Message) -> None:
        # Sender and recipient given: aiosmtplib would otherwise parse them from headers.
        await client.send_message(message, sender=message["From"], recipients=[message["To"]])

    async def _connect(self) -> aiosmtplib.SMTP:
        if self._local_hostname is None:
            # What aiosmtplib would look up again on every connection, off the event loop.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        client = aiosmtplib.SMTP(
            hostname=self.hostname,
            port=self.port,
            username=self.username,
            password=self.password,
            use_tls=self.use_tls,
            start_tls=False if not self.use_tls else None,
            timeout=self.timeout,
            local_hostname=self._local_hostname,
        )
        await client.connect()
        return client


async def _quit(client: aiosmtplib.SMTP) -> None:
    """Say goodbye; a server that is gone already is no error here."""
    try:
        await client.quit()
    except aiosmtplib.SMTPException:
        client.close()


class OutboxMailer:
    """Writes each email as an .eml file in a directory (the embedded default), named
    after its Message-ID: an email sent again replaces its file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, message: Message) -> None:
        await asyncio.to_thread(self._write, message)

    async def close(self) -> None:
        """Nothing held open."""

    def _write(self, message: Message) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        message_id = str(message["Message-ID"] or "").strip("<>")
        name = f"{_SAFE_ID.sub('_', message_id)[:200] or uuid.uuid4().hex}.eml"
        temporary = self.directory / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        temporary.write_bytes(bytes(message))
        # The rename makes the file appear whole, never half-written.
        temporary.rename(self.directory / name)
