"""Options of the RabbitMQ producer, validated once when it is built."""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, get_args
from urllib.parse import quote

from yarl import URL

from ingest.acknowledger import AckAction

# RabbitMQ-only: "retry", a delayed retry through a TTL queue, then the dead-letter queue;
# "release", the message handed back unprocessed, counting neither an attempt nor (on a
# quorum queue) a delivery: a copy at the tail of the queue, then the original acked.
RabbitAckAction = AckAction | Literal["retry", "release"]
RABBIT_ACK_ACTIONS: Final[tuple[str, ...]] = (*get_args(AckAction), "retry", "release")

METADATA_FIELDS: Final = (
    "delivery_tag",
    "redelivered",
    "exchange",
    "routing_key",
    "content_type",
    "content_encoding",
    "headers",
    "persistent",
    "priority",
    "correlation_id",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "reply_to",
    "expiration",
)

AfterConnect = Callable[[Any], Awaitable[None]]


def _int_between(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_types(owner: object, prefix: str, types: tuple[tuple[str, Any, str], ...]) -> None:
    """TypeError saying what to write instead, for the first field of `owner` that is not
    of its type (a bool never passes for another type: `bool` is an `int` in Python)."""
    for name, expected, what in types:
        value = getattr(owner, name)
        if not isinstance(value, expected) or (
            isinstance(value, bool) and not isinstance(True, expected)
        ):
            raise TypeError(f"{prefix}{name} must be {what}, got {value!r}")
        if what is _ARGUMENTS and not all(isinstance(key, str) for key in value):
            raise TypeError(f"{prefix}{name} must be {what} (str keys), got {value!r}")


# What an AMQP arguments table must be; its keys are field names (checked too).
_ARGUMENTS = "a mapping of str to values (an AMQP arguments table)"


def _seconds(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before reconnecting, per failed attempt::

        Backoff("rand_exp", min=1.0, max=30.0)

    `exp` doubles from `min` up to `max`; `rand` is uniform in [min, max]; `rand_exp`
    doubles with jitter; `stop` gives up (the producer stops, readiness stays false).
    """

    type: Literal["exp", "rand", "rand_exp", "stop"] = "rand_exp"
    min: float = 1.0
    max: float = 30.0

    def __post_init__(self) -> None:
        _check(
            self.type in ("exp", "rand", "rand_exp", "stop"),
            f"backoff type must be exp, rand, rand_exp or stop, not {self.type!r}",
        )
        _check(_seconds(self.min) and self.min > 0, f"backoff min must be > 0, got {self.min!r}")
        _check(
            _seconds(self.max) and self.max >= self.min,
            f"backoff max ({self.max!r}) must be >= min ({self.min!r})",
        )


@dataclass(frozen=True, slots=True)
class QueueDeclare:
    """How the queue is declared (`passive=True` only checks that it exists)."""

    durable: bool = True
    auto_delete: bool = False
    exclusive: bool = False
    passive: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    @property
    def queue_type(self) -> str:
        return str(self.arguments.get("x-queue-type", "classic"))

    def __post_init__(self) -> None:
        _check_types(
            self,
            "QueueDeclare ",
            (
                ("durable", bool, "a bool"),
                ("auto_delete", bool, "a bool"),
                ("exclusive", bool, "a bool"),
                ("passive", bool, "a bool"),
                ("arguments", Mapping, _ARGUMENTS),
            ),
        )


@dataclass(frozen=True, slots=True)
class Binding:
    """A binding of the queue to an exchange (the exchange must exist)::

    Binding("amq.topic", routing_key="orders.#")
    """

    exchange: str
    routing_key: str = ""
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(
            self,
            "Binding ",
            (
                ("exchange", str, "an exchange name (str), e.g. Binding('amq.topic')"),
                ("routing_key", str, "a str, e.g. routing_key='orders.#'"),
                ("arguments", Mapping, _ARGUMENTS),
            ),
        )
        _check(bool(self.exchange), "a binding needs an exchange name (not the default one)")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Delayed retries through RabbitMQ itself::

        RetryPolicy(max_attempts=3, delays=(1.0, 10.0))

    A message failed with the `retry` action is republished to `<queue>.retry.<ms>`, a
    queue whose TTL dead-letters it back to `<queue>`, and acknowledged; the attempt count
    travels in the `x-ingest-attempts` header. After `max_attempts` failed attempts the
    message goes to the dead-letter queue. Delay `n` is `delays[n - 1]`, the last repeating.
    """

    max_attempts: int = 3
    delays: tuple[float, ...] = (1.0, 5.0, 30.0)

    def __post_init__(self) -> None:
        _check(
            _int_between(self.max_attempts, 1, 2**31),
            f"retry max_attempts must be an int >= 1, got {self.max_attempts!r}",
        )
        _check_types(
            self, "retry ", (("delays", tuple, "a tuple of seconds, e.g. delays=(1.0, 10.0)"),)
        )
        _check(
            bool(self.delays) and all(_seconds(d) and d > 0 for d in self.delays),
            f"retry delays must be a non-empty tuple of seconds > 0, got {self.delays!r}",
        )

    def delay(self, attempt: int) -> float:
        """The delay before attempt `attempt + 1`, after `attempt` failed ones."""
        return self.delays[min(attempt, len(self.delays)) - 1]


@dataclass(frozen=True, slots=True)
class RabbitMQOptions:
    """Everything the RabbitMQ producer needs; see docs/rabbitmq.md for each option::

        RabbitMQOptions(queue="orders_queue", url="amqp://guest:guest@localhost/%2F",
                      prefetch_count=500, retry=RetryPolicy(max_attempts=3))

    `prefetch_count=None` lets the pipeline pick one its batchers can always fill.
    `dead_letter_queue` (default `<queue>.dlq`, `""` to disable) receives messages that
    failed with `reject` (or their last retry), with `x-ingest-reason` and
    `x-ingest-exception` headers; without one, `reject` is a plain basic.reject.
    """

    queue: str
    url: str | None = None
    host: str = "localhost"
    port: int | None = None
    username: str = "guest"
    password: str = field(default="guest", repr=False)
    virtual_host: str = "/"
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    connection_name: str | None = None
    heartbeat: int = 60
    prefetch_count: int | None = None
    prefetch_size: int = 0
    declare: QueueDeclare | None = field(default_factory=QueueDeclare)
    bindings: tuple[Binding, ...] = ()
    on_success: RabbitAckAction = "ack"
    on_failure: RabbitAckAction | None = None
    retry: RetryPolicy | None = None
    dead_letter_queue: str | None = None
    metadata: tuple[str, ...] = (
        "delivery_tag",
        "redelivered",
        "routing_key",
        "message_id",
        "headers",
    )
    backoff: Backoff = field(default_factory=Backoff)
    after_connect: AfterConnect | None = field(default=None, compare=False)
    consumer_tag: str | None = None
    consume_exclusive: bool = False
    consume_arguments: Mapping[str, Any] = field(default_factory=dict)
    consume_delay: float = 0.0
    no_ack: bool = False
    concurrency: int = 1
    per_producer: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        _check(bool(self.queue), "queue must be a non-empty queue name")
        for scheme in {URL(a.strip()).scheme for a in (self.url or "").split(",") if a.strip()}:
            _check(scheme in ("amqp", "amqps"), f"url must be amqp:// or amqps://, got {scheme!r}")
        _check(
            self.prefetch_count is None or _int_between(self.prefetch_count, 1, 65535),
            f"prefetch_count must be an int >= 1 (without one RabbitMQ pushes the whole queue "
            f"into memory) and at most 65535 (AMQP's limit), got {self.prefetch_count!r}",
        )
        for name, value, low, high, optional in (
            ("port", self.port, 1, 65535, True),  # None: the scheme's default port
            ("heartbeat", self.heartbeat, 0, 65535, False),  # seconds; 0 turns them off
            ("prefetch_size", self.prefetch_size, 0, 2**32 - 1, False),  # bytes; 0: no limit
        ):
            _check(
                (optional and value is None) or _int_between(value, low, high),
                f"{name} must be an int from {low} to {high}, got {value!r}",
            )
        for name, allowed in (
            ("on_success", get_args(AckAction)),  # a success has nothing to retry
            ("on_failure", RABBIT_ACK_ACTIONS),
        ):
            value = getattr(self, name)
            _check(
                value is None or value in allowed,
                f"{name} must be one of {', '.join(allowed)}, not {value!r}",
            )
        _check(
            self.on_failure != "retry" or self.retry is not None,
            "on_failure='retry' needs a retry policy: set retry=RetryPolicy(...)",
        )
        unknown = sorted(set(self.metadata) - set(METADATA_FIELDS))
        _check(
            not unknown, f"unknown metadata fields {unknown}; known: {', '.join(METADATA_FIELDS)}"
        )
        _check(
            _int_between(self.concurrency, 1, 1024),
            f"producer concurrency must be an int >= 1, got {self.concurrency!r}",
        )
        _check(
            _seconds(self.consume_delay),
            f"consume_delay must be seconds >= 0, got {self.consume_delay!r}",
        )
        for index, overrides in self.per_producer.items():
            self._check_overrides(index, overrides)

    def _check_types(self) -> None:
        _check_types(self, "", _OPTION_TYPES)
        if self.after_connect is not None and not callable(self.after_connect):
            raise TypeError(
                f"after_connect must be an async function taking the channel "
                f"(async def hook(channel): ...) or None, got {self.after_connect!r}"
            )
        for index, binding in enumerate(self.bindings):
            if not isinstance(binding, Binding):
                raise TypeError(
                    f"bindings[{index}] must be a Binding(exchange, routing_key), e.g. "
                    f"Binding('amq.topic', routing_key='orders.#'); got {binding!r}"
                )
        for index, name in enumerate(self.metadata):
            if not isinstance(name, str):
                raise TypeError(f"metadata[{index}] must be a field name (str), got {name!r}")

    def _check_overrides(self, index: object, overrides: object) -> None:
        """One producer's overrides: a known index, known options, each valid."""
        _check(
            _int_between(index, 0, self.concurrency - 1),
            f"per_producer key {index!r} is not a producer index (0..{self.concurrency - 1})",
        )
        if not isinstance(overrides, Mapping):
            raise TypeError(
                f"per_producer[{index}] must be a mapping of options, e.g. "
                f"{{'prefetch_count': 100}}; got {overrides!r}"
            )
        bad = sorted(set(overrides) - set(self.__dataclass_fields__))
        _check(not bad, f"per_producer[{index}] has unknown options {bad}")
        shared = sorted(set(overrides) & {"concurrency", "per_producer"})
        _check(not shared, f"per_producer[{index}] cannot set {', '.join(shared)}")
        try:
            replace(self, **overrides, per_producer={})
        except (TypeError, ValueError) as error:
            raise type(error)(f"per_producer[{index}]: {error}") from error

    def failure_action(self, raised: bool) -> RabbitAckAction:
        """`on_failure`, or by default: `retry` for a message whose handler raised when there
        is a retry policy (the cause may pass), `reject` otherwise — a message failed on
        purpose (`message.failed(reason)`) goes straight to the dead-letter queue. Never an
        endless requeue loop."""
        if self.on_failure is not None:
            return self.on_failure
        return "retry" if raised and self.retry is not None else "reject"

    @property
    def dlq_name(self) -> str | None:
        if self.dead_letter_queue == "":
            return None
        return self.dead_letter_queue or f"{self.queue}.dlq"

    def connection_url(self) -> str:
        """The AMQP URL, from `url` or from the parts."""
        if self.url is not None:
            return self.url
        scheme = "amqps" if self.ssl_context is not None else "amqp"
        port = f":{self.port}" if self.port else ""
        return (
            f"{scheme}://{quote(self.username, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}{port}/{quote(self.virtual_host, safe='')}"
        )

    def for_producer(self, index: int) -> RabbitMQOptions:
        """These options with producer `index`'s overrides applied."""
        overrides = self.per_producer.get(index)
        return replace(self, **overrides, per_producer={}) if overrides else self


# Each option's type and what to write instead; checked before any value is.
_OPTION_TYPES: Final[tuple[tuple[str, Any, str], ...]] = (
    ("queue", str, "a queue name (str)"),
    ("url", str | None, "an amqp:// URL (str) or None"),
    ("host", str, "a host name (str)"),
    ("username", str, "a str"),
    ("password", str, "a str"),
    ("virtual_host", str, "a str, e.g. '/'"),
    (
        "ssl_context",
        ssl.SSLContext | None,
        "an ssl.SSLContext (e.g. ssl.create_default_context()) or None",
    ),
    ("connection_name", str | None, "a str or None"),
    (
        "declare",
        QueueDeclare | None,
        "a QueueDeclare(...) or None, e.g. declare=QueueDeclare(durable=True)",
    ),
    (
        "bindings",
        tuple,
        "a tuple of Binding, e.g. bindings=(Binding('amq.topic', routing_key='orders.#'),)",
    ),
    (
        "retry",
        RetryPolicy | None,
        "a RetryPolicy(...) or None, e.g. retry=RetryPolicy(max_attempts=3, delays=(1.0, 10.0))",
    ),
    (
        "dead_letter_queue",
        str | None,
        "a queue name (str), '' to turn dead-lettering off, or None for <queue>.dlq",
    ),
    ("metadata", tuple, "a tuple of field names, e.g. metadata=('message_id', 'headers')"),
    ("backoff", Backoff, "a Backoff(...), e.g. backoff=Backoff('exp', min=1.0, max=30.0)"),
    ("consumer_tag", str | None, "a str or None"),
    ("consume_exclusive", bool, "a bool"),
    ("consume_arguments", Mapping, _ARGUMENTS),
    ("no_ack", bool, "a bool"),
    (
        "per_producer",
        Mapping,
        "a mapping of producer index to options, e.g. {1: {'prefetch_count': 100}}",
    ),
)
