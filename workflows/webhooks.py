"""Webhooks: run events POSTed to receivers, durably, from the audit trail's outbox.

Each configured receiver (`webhooks:` in the configuration, `settings.Webhook`) gets the
events its `events` patterns match, one JSON POST each, signed with HMAC-SHA256 of the body
(`X-Nodepatch-Signature: sha256=<hex>`) when it has a secret, and carrying the event's ID as
`Idempotency-Key`. Delivery is at least once: an attempt whose answer was lost is sent again
with the same key and the same body. A failed attempt (refused, timed out, not 2xx) is retried
with exponential backoff; after `max_attempts` the delivery is parked until `nodepatch webhooks
retry`. The outbox itself is `engine.outbox`."""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import errors
from engine.model import utcnow
from engine.outbox import Delivery, Outbox, OutboxEvent

CONSUMER = "webhooks"
PREFIXES = {"cluster_cycle": "cycle"}  # every other workflow's events are run.*
ENDINGS = {
    "Done": "done",
    "Failed": "failed",
    "Aborted": "aborted",
    "Refused": "refused",
    "Abandoned": "abandoned",
}
KINDS = {"created": "started", "waiting": "waiting", "sleeping": "sleeping"}
SUFFIXES = ("started", "waiting", "sleeping", *ENDINGS.values(), "transition")
EVENT_NAMES = tuple(f"{p}.{s}" for p in ("run", "cycle") for s in SUFFIXES)
CLAIM_SLACK = dt.timedelta(seconds=30)
# Events already this old when first read are not sent: webhooks configured on a database
# with months of history announce what happens from then on, not the backlog.
BACKLOG_MAX_AGE = dt.timedelta(days=1)


def event_name(event: OutboxEvent) -> str | None:
    """What a receiver calls an audit event (None: not sent; leases and signals are not)."""
    prefix = PREFIXES.get(event.workflow, "run")
    if event.kind in KINDS:
        return f"{prefix}.{KINDS[event.kind]}"
    if event.kind == "transition":
        return f"{prefix}.{ENDINGS.get(event.to_state or '', 'transition')}"
    return None


def matches_any(pattern: str) -> bool:
    """Whether an `events` pattern names at least one event (typos are refused)."""
    return any(fnmatch.fnmatchcase(name, pattern) for name in EVENT_NAMES)


def default_name(url: str | None, url_env: str | None) -> str:
    """A receiver's stable name when none is given: its URL's host and a hash of the URL
    (the URL itself may hold a token), or the variable holding it."""
    if url is None:
        return f"env:{url_env}"
    host = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{host}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def reason(event: OutboxEvent) -> str | None:
    details = event.details
    error = details.get("error")
    if isinstance(error, Mapping) and error.get("reason"):
        return str(error["reason"])
    for key in ("reason", "signal"):
        if details.get(key):
            return f"{key}: {details[key]}" if key == "signal" else str(details[key])
    return None


def payload(event: OutboxEvent, name: str) -> dict[str, Any]:
    return {
        "event": name,
        "event_id": event.id,
        "run_id": event.run_id,
        "workflow": event.workflow,
        "subject": event.subject,
        "state": event.state,
        "from_state": event.from_state,
        "time": event.occurred_at.isoformat(),
        "actor": event.actor,
        "reason": reason(event),
    }


def summary_line(doc: Mapping[str, Any]) -> str:
    line = f"nodepatch {doc['event']}: run {doc['run_id']} ({doc['subject']}) is {doc['state']}"
    return f"{line}: {doc['reason']}" if doc["reason"] else line


def body(event: OutboxEvent, name: str, fmt: str) -> bytes:
    """The request body: the event as JSON, or a chat message (`slack`: `{"text": ...}`;
    `teams`: an Adaptive Card message for a Teams Workflows webhook). The same every time."""
    doc = payload(event, name)
    if fmt == "slack":
        doc = {"text": summary_line(doc)}
    elif fmt == "teams":
        card = {
            "type": "AdaptiveCard",
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "version": "1.4",
            "body": [{"type": "TextBlock", "text": summary_line(doc), "wrap": True}],
        }
        doc = {
            "type": "message",
            "attachments": [
                {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
            ],
        }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def signature(data: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


class DeliveryFailed(errors.EngineError):
    """The receiver did not accept the delivery."""


def post(url: str, data: bytes, headers: Mapping[str, str], timeout: float) -> None:
    """POST data; DeliveryFailed unless the answer is 2xx. Errors never name the URL."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, headers=dict(headers), method="POST")  # noqa: S310 - http(s) only, checked in settings
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            status = answer.status
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DeliveryFailed(f"cannot connect: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise DeliveryFailed(
            f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else str(exc)
        ) from None
    if not 200 <= status < 300:
        raise DeliveryFailed(f"HTTP {status}")


@dataclass(frozen=True)
class Receiver:
    """A configured webhook with its URL and secret read from where they live."""

    name: str
    url: str
    secret: str | None
    events: tuple[str, ...]
    timeout_s: float
    max_attempts: int
    backoff_s: float
    backoff_max_s: float
    format: str

    def wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.events)

    def retry_at(self, attempts: int, now: dt.datetime) -> dt.datetime | None:
        """When to try again after `attempts` failed attempts; None: park it."""
        if attempts >= self.max_attempts:
            return None
        delay = min(self.backoff_s * 2 ** (attempts - 1), self.backoff_max_s)
        return now + dt.timedelta(seconds=delay)


def receivers(hooks: Sequence[Any], environ: Mapping[str, str]) -> list[Receiver]:
    """The configured webhooks (`settings.Webhook`) with URLs and secrets resolved; a missing
    variable or unreadable file is a ConfigError naming the key."""
    found = []
    for i, hook in enumerate(hooks):
        where = f"webhooks[{i}]"
        url = hook.url if hook.url is not None else _env(environ, hook.url_env, f"{where}.url_env")
        secret = None
        if hook.secret_env:
            secret = _env(environ, hook.secret_env, f"{where}.secret_env")
        elif hook.secret_file:
            try:
                secret = Path(hook.secret_file).expanduser().read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise errors.ConfigError(
                    f"{where}.secret_file: cannot read {hook.secret_file}: {exc.strerror}"
                ) from exc
        found.append(
            Receiver(
                hook.name,
                url,
                secret,
                tuple(hook.events),
                hook.timeout_s,
                hook.max_attempts,
                hook.backoff_s,
                hook.backoff_max_s,
                hook.format,
            )
        )
    return found


def _env(environ: Mapping[str, str], name: str, where: str) -> str:
    value = environ.get(name, "")
    if not value:
        raise errors.ConfigError(f"{where}: environment variable {name} is not set")
    return value


@dataclass
class Report:
    sent: int = 0
    failed: int = 0
    parked: int = 0
    errors: list[str] = field(default_factory=list)


Post = Callable[[str, bytes, Mapping[str, str], float], None]


class Deliverer:
    """Routes new events into the outbox and sends what is due."""

    def __init__(
        self,
        outbox: Outbox,
        hooks: Sequence[Receiver],
        *,
        send: Post = post,
        now: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.outbox, self.send, self.now = outbox, send, now
        self.hooks = {h.name: h for h in hooks}

    def route(self, event: OutboxEvent) -> list[tuple[str, str]]:
        name = event_name(event)
        if name is None or event.occurred_at < self.now() - BACKLOG_MAX_AGE:
            return []
        return [(hook.name, name) for hook in self.hooks.values() if hook.wants(name)]

    def flush(self) -> Report:
        """Route new events, then make one attempt at every due delivery. A receiver that
        fails is not tried again in this pass (a down receiver costs one timeout, not one per
        event); its other deliveries wait for the next pass."""
        report = Report()
        self.outbox.scan(self.route, now=self.now())
        failing: set[str] = set()
        for delivery in self.outbox.due(self.now()):
            hook = self.hooks.get(delivery.target)
            if hook is None or hook.name in failing:
                continue  # a receiver no longer configured keeps its deliveries pending
            now = self.now()
            until = now + dt.timedelta(seconds=hook.timeout_s) + CLAIM_SLACK
            if not self.outbox.claim(delivery, now, until):
                continue
            if not self._attempt(hook, delivery, report):
                failing.add(hook.name)
        return report

    def _attempt(self, hook: Receiver, delivery: Delivery, report: Report) -> bool:
        data = body(delivery.event, delivery.name, hook.format)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "nodepatch-webhooks",
            "Idempotency-Key": str(delivery.event.id),
            "X-Nodepatch-Event": delivery.name,
        }
        if hook.secret:
            headers["X-Nodepatch-Signature"] = signature(data, hook.secret)
        try:
            self.send(hook.url, data, headers, hook.timeout_s)
        except DeliveryFailed as exc:
            attempts = delivery.attempts + 1
            retry = hook.retry_at(attempts, self.now())
            self.outbox.failed(delivery, str(exc), retry)
            report.failed += 1
            report.parked += retry is None
            report.errors.append(
                f"{hook.name}: event {delivery.event.id} ({delivery.name}): {exc}"
                + ("; parked" if retry is None else f"; retried at {retry:%H:%M:%S} UTC")
            )
            return False
        self.outbox.delivered(delivery, self.now())
        report.sent += 1
        return True

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Flush every `interval_s` until `stop` (the worker's delivery thread)."""
        import logging

        log = logging.getLogger("nodepatch.webhooks")
        while not stop.is_set():
            try:
                report = self.flush()
            except errors.EngineError as exc:
                log.warning(
                    "webhook delivery pass failed: %s", exc, extra={"action": "webhook_error"}
                )
            else:
                for line in report.errors:
                    log.warning(
                        "webhook delivery failed: %s", line, extra={"action": "webhook_failed"}
                    )
                if report.sent:
                    log.info(
                        "%d webhook deliveries sent", report.sent, extra={"action": "webhook_sent"}
                    )
            stop.wait(interval_s)


def deliverer(store: Any, hooks: Sequence[Any], environ: Mapping[str, str]) -> Deliverer:
    """The deliverer of the configured webhooks on the store's database."""
    return Deliverer(Outbox(store.engine, CONSUMER), receivers(hooks, environ))
