"""SMTP micro-benchmark: what sending one digest costs the sending process, with the
project's client (`pipelines.smtp`, through `SmtpMailer`) and with aiosmtplib (when
installed: the dev extra has it), against an aiosmtpd server in a process of its own.

Each case sends --digests digests of --notifications notifications each, --concurrency
at a time, over connections kept open. CPU is this process's (`time.process_time`): the
figure to compare is cpu_us_per_digest. It runs on uvloop when installed, as the service
does. One JSON line per case:

    build            digest(): the email written out, nothing sent
    mailer           SmtpMailer.send, the server answering each command in turn
    mailer_pipelined the same, the server offering PIPELINING (as Postfix, Exim and the
                     large providers do; aiosmtpd takes pipelined commands but does not
                     say so unless told)
    aiosmtplib       aiosmtplib.SMTP.sendmail of the same bytes, connections kept open

    python bench/smtp.py [--digests 5000] [--notifications 10] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pipelines.mail import Email, SmtpMailer, digest
from pipelines.payloads import Notification

SENDER = "tickets@example.com"


def serve(port: int, pipelining: bool) -> None:
    """The SMTP server process: accepts every message, keeps nothing."""
    from aiosmtpd.controller import Controller

    class Accepting:
        async def handle_EHLO(
            self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
        ) -> list[str]:
            session.host_name = hostname
            if pipelining:
                responses.insert(1, "250-PIPELINING")
            return responses

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    Controller(Accepting(), hostname="127.0.0.1", port=port).start()
    while True:
        time.sleep(3600)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def emails(count: int, notifications: int) -> list[Email]:
    listed = [
        (f"n-{n:08d}", Notification("email", "someone@example.com", {"event": "cinema"}))
        for n in range(notifications)
    ]
    return [
        digest(SENDER, f"person{i}@example.com", listed, f"<digest.{i}@example.com>")
        for i in range(count)
    ]


async def measure(
    case: str, count: int, concurrency: int, send: Callable[[int], Awaitable[None]]
) -> dict[str, Any]:
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            await send(i)

    await asyncio.gather(*(one(i) for i in range(min(count, 200))))  # connections opened
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(count)))
    took, used = time.perf_counter() - started, time.process_time() - cpu
    return {
        "case": case,
        "digests": count,
        "digests_per_s": round(count / took),
        "cpu_us_per_digest": round(used / count * 1e6, 1),
    }


async def run(arguments: argparse.Namespace, port: int, pipelined_port: int) -> None:
    count, per = arguments.digests, arguments.notifications
    prepared = emails(count, per)
    listed = [
        (f"n-{n:08d}", Notification("email", "someone@example.com", {"event": "cinema"}))
        for n in range(per)
    ]

    async def build(i: int) -> None:
        digest(SENDER, f"person{i}@example.com", listed, f"<digest.{i}@example.com>")

    results = [await measure("build", count, arguments.concurrency, build)]
    for case, server in (("mailer", port), ("mailer_pipelined", pipelined_port)):
        mailer = SmtpMailer(f"smtp://127.0.0.1:{server}", connections=arguments.concurrency)

        async def send(i: int, mailer: SmtpMailer = mailer) -> None:
            await mailer.send(prepared[i])

        results.append(await measure(case, count, arguments.concurrency, send))
        await mailer.close()
    try:
        import aiosmtplib
    except ImportError:
        print(json.dumps({"case": "aiosmtplib", "skipped": "not installed"}))
    else:
        idle: list[aiosmtplib.SMTP] = []

        async def library(i: int) -> None:
            client = (
                idle.pop()
                if idle
                else aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            )
            if not client.is_connected:
                await client.connect()
            email = prepared[i]
            await client.sendmail(email.sender, [email.recipient], email.data)
            idle.append(client)

        results.append(await measure("aiosmtplib", count, arguments.concurrency, library))
        for client in idle:
            await client.quit()
    for result in results:
        print(json.dumps({**result, "notifications_per_digest": per}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digests", type=int, default=5_000)
    parser.add_argument("--notifications", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=20)
    arguments = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    ports = free_port(), free_port()
    servers = [
        context.Process(target=serve, args=(port, pipelining), daemon=True)
        for port, pipelining in zip(ports, (False, True), strict=True)
    ]
    for server in servers:
        server.start()
    try:
        time.sleep(1.5)  # the servers listen
        # The loop the service runs on (ingest's `fast` extra), else asyncio's own.
        try:
            import uvloop
        except ImportError:
            asyncio.run(run(arguments, *ports))
        else:
            uvloop.run(run(arguments, *ports))
    finally:
        for server in servers:
            server.kill()


if __name__ == "__main__":
    main()
