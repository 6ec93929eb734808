"""Mail: the digest email of a batch of notifications and the report of an upload, sent
over SMTP or written to an outbox directory as .eml files."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from email import policy
from email.charset import QP, Charset
from email.message import EmailMessage
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from ingest.service import tracing
from ingest.service.settings import Settings
from pipelines.payloads import Notification
from pipelines.smtp import SmtpConnection, SmtpDisconnected, envelope_address

# A larger errors CSV stays on the server (GET /uploads/<id>/errors.csv): mail servers
# commonly refuse messages over 10-25 MB.
ATTACHMENT_MAX_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class Email:
    """An email ready to go: its envelope and its bytes (RFC 5322, CRLF line ends).
    ValueError for an envelope address an SMTP command cannot carry (a line break, a
    comma: `envelope_address`), whatever let it through before."""

    sender: str
    recipient: str
    message_id: str
    data: bytes

    def __post_init__(self) -> None:
        envelope_address(self.sender)
        envelope_address(self.recipient)


class Mailer(Protocol):
    async def send(self, email: Email) -> None: ...

    async def close(self) -> None: ...


def mailer_for(settings: Settings, connections: int = 1) -> Mailer:
    """SMTP when INGEST_SMTP_URL is set (keeping up to `connections` open), else the
    outbox directory."""
    if settings.smtp_url is not None:
        return SmtpMailer(settings.smtp_url.get_secret_value(), connections=connections)
    return OutboxMailer(settings.mail_outbox)


# The digests' and reports' sender when INGEST_MAIL_FROM is not set.
SENDER = "tickets@ingest.local"


def sender_of(settings: Settings) -> str:
    """Who the app's emails come from: INGEST_MAIL_FROM, else SENDER."""
    return settings.mail_from or SENDER


def digest(
    sender: str,
    recipient: str,
    notifications: Sequence[tuple[str, Notification]],
    message_id: str | None = None,
) -> Email:
    """One email listing every notification of a batch, each with its message id, under
    `message_id` (`window_message_id`: the same for every attempt of a window) or a new
    one.

    Plain 7-bit ASCII is written out directly (20 µs a digest; the email package took 100
    to build and flatten it, and 550 with `EmailMessage`); other text goes through the
    email package: UTF-8 in quoted-printable, headers encoded (RFC 2047)."""
    count = len(notifications)
    lines = [
        f"Hello {recipient},",
        "",
        f"{count} update{'s' if count != 1 else ''} on your bookings:",
        "",
    ]
    for notification_id, notification in notifications:
        event = notification.details.get("event")
        what = f"your {event} ticket is booked" if event else f"{notification.type} notification"
        lines.append(f"- {what} (ref {notification_id})")
    lines += ["", "-- ingest tickets", ""]
    subject = f"Your {count} ticket notification{'s' if count != 1 else ''}"
    message_id = message_id or make_msgid(domain=sender.rpartition("@")[2] or None)
    headers = {
        "From": sender,
        "To": recipient,
        "Subject": subject,
        "Message-ID": message_id,
        "Date": formatdate(),
    }
    if all(_plain(value) for value in headers.values()) and all(map(_plain, lines)):
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        body = "\r\n".join(lines)
        return Email(sender, recipient, message_id, f"{head}{_PLAIN_TEXT}\r\n{body}".encode())
    message = MIMENonMultipart("text", "plain")
    message.set_payload("\n".join(lines), _UTF8_QUOTED_PRINTABLE)
    for name, value in headers.items():
        message[name] = value  # non-ASCII headers are encoded (RFC 2047) when flattened
    return Email(sender, recipient, message_id, message.as_bytes(policy=_SMTP_COMPAT))


def _plain(text: str) -> bool:
    """Writable as it is in a 7-bit message: printable ASCII, on a line short enough."""
    return text.isascii() and text.isprintable() and len(text) <= _LINE_MAX


_LINE_MAX = 900  # under SMTP's 998, with room for a header's name
_PLAIN_TEXT = (
    "MIME-Version: 1.0\r\n"
    'Content-Type: text/plain; charset="us-ascii"\r\n'
    "Content-Transfer-Encoding: 7bit\r\n"
)
_SMTP_COMPAT = policy.compat32.clone(linesep="\r\n")


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
) -> Email:
    """The email ending an upload: its summary and, when rows failed, the errors CSV
    (`line,row,reason`; a path and the name to attach it under)."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message_id = make_msgid(domain=sender.rpartition("@")[2] or None)
    message["Message-ID"] = message_id
    message["Date"] = formatdate()
    body = [f"Hello {recipient},", "", *summary]
    if errors is not None and errors[0].stat().st_size > ATTACHMENT_MAX_BYTES:
        body += ["", "The errors CSV is too large to attach; it is kept on the server."]
        errors = None
    message.set_content("\n".join([*body, "", "-- ingest tickets", ""]))
    if errors is not None:
        path, name = errors
        message.add_attachment(path.read_bytes(), maintype="text", subtype="csv", filename=name)
    return Email(sender, recipient, message_id, bytes(message))


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
        self._idle: list[SmtpConnection] = []
        self._local_hostname: str | None = None

    async def send(self, email: Email) -> None:
        attributes = {
            "server.address": self.hostname,
            "server.port": self.port,
            "ingest.mail.message_id": email.message_id,
        }
        with tracing.client_span("smtp send", attributes):
            await self._send(email)

    async def _send(self, email: Email) -> None:
        connection = self._idle.pop() if self._idle else None
        try:
            if connection is None or not connection.is_open:
                connection = await self._connect()
            try:
                await connection.send(email.sender, email.recipient, email.data)
            except SmtpDisconnected:
                connection.close()
                connection = await self._connect()
                await connection.send(email.sender, email.recipient, email.data)
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        if len(self._idle) < self.connections:
            self._idle.append(connection)
        else:
            await connection.quit()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.quit()

    async def _connect(self) -> SmtpConnection:
        if self._local_hostname is None:
            # Looked up once, off the event loop.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        return await SmtpConnection.open(
            self.hostname,
            self.port,
            local_hostname=self._local_hostname,
            use_tls=self.use_tls,
            username=self.username,
            password=self.password,
            timeout=self.timeout,
        )


class OutboxMailer:
    """Writes each email as an .eml file in a directory (the embedded default), named
    after its Message-ID: an email sent again replaces its file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, email: Email) -> None:
        attributes = {
            "ingest.mail.outbox": str(self.directory),
            "ingest.mail.message_id": email.message_id,
        }
        with tracing.client_span("outbox write", attributes):
            await asyncio.to_thread(self._write, email)

    async def close(self) -> None:
        """Nothing held open."""

    def _write(self, email: Email) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        message_id = email.message_id.strip("<>")
        name = f"{_SAFE_ID.sub('_', message_id)[:200] or uuid.uuid4().hex}.eml"
        temporary = self.directory / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        temporary.write_bytes(email.data)
        # The rename makes the file appear whole, never half-written.
        temporary.rename(self.directory / name)
