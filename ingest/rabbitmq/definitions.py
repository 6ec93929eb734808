"""RabbitMQ definitions: add a user, with its password hashed the way RabbitMQ does, to
a definitions template, so that a broker can boot with its queues and a non-guest user.

    python -m ingest.rabbitmq.definitions config/rabbitmq/definitions.json out.json

reads the user from RABBITMQ_USER and RABBITMQ_PASSWORD.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def with_user(template: dict[str, Any], user: str, password: str) -> dict[str, Any]:
    """The template plus an administrator `user` with every permission on its vhosts."""
    definitions = dict(template)
    definitions["users"] = [
        {
            "name": user,
            "password_hash": password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": ["administrator"],
        }
    ]
    vhosts = [v["name"] for v in definitions.get("vhosts", [{"name": "/"}])]
    definitions["permissions"] = [
        {"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
        for vhost in vhosts
    ]
    return definitions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render RabbitMQ definitions with a user.")
    parser.add_argument("template", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    user, password = os.environ.get("RABBITMQ_USER"), os.environ.get("RABBITMQ_PASSWORD")
    if not user or not password:
        print("definitions: set RABBITMQ_USER and RABBITMQ_PASSWORD", file=sys.stderr)
        return 2
    template = json.loads(args.template.read_text())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(with_user(template, user, password), indent=2))
    print(f"definitions for user {user} written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
