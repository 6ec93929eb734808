"""`ingest pause` / `ingest resume`: the command line's side of the admin endpoints of a
running service (its HTTP port: under `ingest run --workers N`, the supervisor's, which
passes the pause on to every worker)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from ingest.exceptions import StartupError
from ingest.service.settings import Settings


def service_urls(settings: Settings, urls: Sequence[str] | None) -> list[str]:
    """The services to reach: the given URLs (replicas), else this host's HTTP port."""
    if urls:
        return [url.rstrip("/") for url in urls]
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
    return [f"http://{host}:{settings.http_port}"]


def post(url: str, token: str | None, timeout: float = 30.0) -> dict[str, Any]:
    """POST with the admin token; the JSON answer, or StartupError saying what failed."""
    request = urllib.request.Request(url, method="POST", data=b"")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as error:
        try:
            reason = json.loads(error.read()).get("error", error.reason)
        except ValueError:
            reason = error.reason
        raise StartupError(f"{url}: {error.code} {reason}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StartupError(f"{url}: no service answers ({reason})") from error


def hold(settings: Settings, pipeline: str, pause: bool, urls: list[str]) -> int:
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    action = "pause" if pause else "resume"
    for base in urls:
        answer = post(f"{base}/pipelines/{pipeline}/{action}", token)
        holds = ", ".join(answer.get("holds") or ["none"])
        state = "paused" if answer.get("paused") else "consuming"
        print(f"{pipeline} at {base}: {state} (holds: {holds})")
    return 0
