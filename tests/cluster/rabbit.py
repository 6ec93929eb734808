"""A three-node RabbitMQ cluster on this machine, beside the main broker: each node its own
name, ports and data directory (RABBITMQ_CONF_ENV_FILE), joined with `rabbitmqctl
join_cluster`. Node 1 serves the management API (to see which consumer is active)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

BASE_PORT = 5710  # nodes on 5711.., distribution on 25711.., management on 15711


@dataclass(frozen=True)
class Node:
    number: int
    directory: Path

    @property
    def name(self) -> str:
        return f"ingest-cluster-{self.number}@localhost"

    @property
    def port(self) -> int:
        return BASE_PORT + self.number

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def management_port(self) -> int:
        return 10000 + BASE_PORT + self.number

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.name, "-q", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.name}: {done.stderr}")
        return done.stdout

    def write_config(self) -> None:
        base = self.directory
        base.mkdir(parents=True, exist_ok=True)
        plugins = ["rabbitmq_consistent_hash_exchange"]
        config = [
            f"listeners.tcp.local = 127.0.0.1:{self.port}",
            "loopback_users = none",
            "collect_statistics_interval = 500",  # consumers seen in the API sooner
        ]
        if self.number == 1:
            plugins.append("rabbitmq_management")
            config.append(f"management.tcp.port = {self.management_port}")
            config.append("management.tcp.ip = 127.0.0.1")
        else:
            plugins.append("rabbitmq_management_agent")
        (base / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        (base / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        (base / "env.conf").write_text(
            "\n".join(
                [
                    f"NODENAME={self.name}",
                    f"NODE_PORT={self.port}",
                    f"DIST_PORT={20000 + self.port}",
                    f"MNESIA_BASE={base}/mnesia",
                    f"LOG_BASE={base}/log",
                    f"ENABLED_PLUGINS_FILE={base}/enabled_plugins",
                    f"CONFIG_FILE={base}/rabbitmq.conf",
                    "ERL_EPMD_ADDRESS=127.0.0.1",
                ]
            )
            + "\n"
        )

    def start_server(self) -> None:
        env = {**os.environ, "RABBITMQ_CONF_ENV_FILE": str(self.directory / "env.conf")}
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, timeout=60)

    def running(self) -> bool:
        try:
            self.ctl("await_startup", "--timeout", "1", timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def kill_leftover(self) -> None:
        """A node of an interrupted run, up or half-booted: whatever listens on this node's
        distribution port is stopped (rabbitmqctl), else killed."""
        if self.running():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.ctl("stop", timeout=60)
        listening = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{20000 + self.port}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for pid in re.findall(r"pid=(\d+)", listening):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(1 if listening else 0)

    def await_startup(self, timeout: float = 120) -> None:
        """Until the node runs: `await_startup` fails at once while the node has not
        registered with epmd yet, so it is asked again."""
        deadline = time.monotonic() + timeout
        while not self.running():
            if time.monotonic() > deadline:
                log = "".join(
                    path.read_text()[-2000:] for path in (self.directory / "log").glob("*.log")
                )
                raise RuntimeError(f"{self.name} did not start within {timeout}s: {log}")
            time.sleep(0.5)


class Cluster:
    """Three nodes; `urls` is what the service takes (`INGEST_AMQP_URL`, comma-separated)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.nodes = [Node(n, directory / f"node{n}") for n in (1, 2, 3)]

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.kill_leftover()
            shutil.rmtree(node.directory, ignore_errors=True)
            node.write_config()
        _hand_to_rabbitmq(self.directory)
        for node in self.nodes:
            node.start_server()
        for node in self.nodes:
            node.await_startup()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        for node in self.nodes:
            node.await_startup()

    def healthy(self) -> bool:
        """Whether the three nodes run, clustered."""
        if not all(node.running() for node in self.nodes):
            return False
        status = self.nodes[0].ctl("cluster_status", "--formatter", "json")
        return all(node.name in json.loads(status)["running_nodes"] for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill_leftover()
        shutil.rmtree(self.directory, ignore_errors=True)

    def api(self, path: str) -> Any:
        first = self.nodes[0]
        request = urllib.request.Request(
            f"http://127.0.0.1:{first.management_port}/api/{path}",
            headers={"Authorization": "Basic " + b64encode(b"guest:guest").decode()},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def active_consumer_pids(self, queues: list[str]) -> dict[str, int | None]:
        """For each queue, the pid of the process whose consumer is its single active one
        (from the connection's name, `ingest-notifications (host pid 42)`), or None."""
        pids: dict[str, int] = {}
        for connection in self.api("connections"):
            given = connection.get("user_provided_name") or ""
            if "pid " in given:
                pids[connection["name"]] = int(given.rsplit("pid ", 1)[1].rstrip(")"))
        active: dict[str, int | None] = {}
        for queue in queues:
            details = self.api(f"queues/%2F/{quote(queue, safe='')}")
            # A consumer whose channel the management database has not caught up with
            # shows `channel_details` as an empty list: not known yet, so not counted.
            owners = [
                pids.get(consumer["channel_details"]["connection_name"])
                for consumer in details.get("consumer_details", [])
                if consumer.get("active") and isinstance(consumer.get("channel_details"), dict)
            ]
            active[queue] = owners[0] if owners else None
        return active

    def wait_for_management(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api("overview")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _hand_to_rabbitmq(directory: Path) -> None:
    """Debian's rabbitmq-server runs as the rabbitmq user when started by root: it must
    own its directories."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("rabbitmq")
    except KeyError:
        return
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
