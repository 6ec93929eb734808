"""SmtpMailer against a real SMTP server (aiosmtpd): connections are kept open and reused,
and one the server dropped is replaced without failing the email."""

from __future__ import annotations

import asyncio
from typing import Any

from pipelines.mail import SmtpMailer, digest
from pipelines.payloads import Notification
from tests.integration.service import Inbox, smtp_server


class CountingInbox(Inbox):
    """An inbox that also counts the connections greeted (one EHLO each)."""

    greetings = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.greetings += 1
        session.host_name = hostname
        return responses


def email(n: int) -> Any:
    notification = Notification("email", "foo@email.com", {})
    return digest("ingest@example.com", "foo@email.com", [(f"n-{n}", notification)])


async def test_digests_go_over_connections_kept_open() -> None:
    async with smtp_server() as server:
        server.inbox = inbox = CountingInbox()
        server.stop()
        server.start()  # with the counting inbox
        mailer = SmtpMailer(f"smtp://127.0.0.1:{server.port}", connections=2)
        try:
            for n in range(5):
                await mailer.send(email(n))
            assert inbox.greetings == 1
            # Three at once: as many connections as sends under way; two kept afterwards.
            await asyncio.gather(*(mailer.send(email(n)) for n in range(5, 8)))
            assert inbox.greetings == 3
            assert len(mailer._idle) == 2
        finally:
            await mailer.close()
        assert len(inbox.messages) == 8
        assert mailer._idle == []


async def test_a_connection_the_server_dropped_is_replaced() -> None:
    async with smtp_server() as server:
        mailer = SmtpMailer(f"smtp://127.0.0.1:{server.port}")
        try:
            await mailer.send(email(1))
            server.stop()  # closes the connection the mailer keeps
            server.start()
            await mailer.send(email(2))
        finally:
            await mailer.close()
        assert [m["Subject"] for m in server.inbox.messages] == ["Your 1 ticket notification"] * 2
