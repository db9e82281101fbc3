"""Webhooks: run events reach a real HTTP receiver on 127.0.0.1, signed, with the event ID as
idempotency key; nothing is lost when the receiver is down, slow or answers 500; deliveries are
parked after too many failures and sent again on `webhooks retry`."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine import outbox
from engine.model import utcnow
from engine.store import Store
from tests.clitools import FAST_CONFIG, Cli, make_cli
from tests.test_cli_acceptance import MIXED
from tests.webhook_receiver import ERROR, OK, SLOW, Receiver, closed_port, serve
from workflows import webhooks
from workflows.backends.simulated import SimulatedCluster
from workflows.webhooks import Receiver as Receiver_

SECRET = "hook-secret-Zq9"
RUN_EVENTS = ["run.started", "run.transition", "run.transition", "run.transition",
              "run.transition", "run.done"]  # fmt: skip


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    server = serve(found)
    yield found
    server.shutdown()
    server.server_close()


def hook_cli(tmp_path: Path, db_url: str, url: str, **options: object) -> Cli:
    hook = {"url": url, "events": ["run.*"], "secret_env": "HOOK_SECRET", "timeout_s": 0.5}
    hook.update(options)
    cli = make_cli(tmp_path, db_url, FAST_CONFIG + f"webhooks: [{json.dumps(hook)}]\n")
    SimulatedCluster.create(cli.sim, MIXED)
    return cli


def run_env() -> dict[str, str]:
    return {"HOOK_SECRET": SECRET}


def start(cli: Cli) -> str:
    result = cli("start", "--cluster", "c1", "--node", "hv1", "--json", env=run_env())
    assert result.code == 0, result.err
    return str(result.json()["run_id"])


def test_a_run_delivers_its_events_signed_before_the_command_exits(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    """With no worker, the command driving the run delivers what it produced before it exits:
    one POST per event, in order, each carrying event, run_id, workflow, state and event_id, the
    event ID as Idempotency-Key, and an HMAC-SHA256 signature of the exact body."""
    cli = hook_cli(tmp_path, db_url, receiver.url)
    run_id = start(cli)
    got = receiver.accepted()
    assert [r.doc["event"] for r in got] == RUN_EVENTS
    assert [r.doc["state"] for r in got] == [
        "Preflight", "Draining", "Patching", "Enabling", "Rebalancing", "Done",
    ]  # fmt: skip
    ids = [r.doc["event_id"] for r in got]
    assert ids == sorted(set(ids))
    for r in got:
        assert r.doc["run_id"] == run_id and r.doc["workflow"] == "node_patch"
        assert r.headers["Idempotency-Key"] == str(r.doc["event_id"])
        expected = hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
        assert r.headers["X-Nodepatch-Signature"] == f"sha256={expected}"
    status = cli("webhooks", "status", "--json", env=run_env()).json()
    (name,) = status["configured"]
    assert status["targets"][name] == {
        "pending": 0, "delivered": 6, "parked": 0, "failed_attempts": 0,
    }  # fmt: skip
    again = cli("webhooks", "deliver", "--json", env=run_env())
    assert again.code == 0 and again.json()["sent"] == 0
    assert len(receiver.received) == 6  # nothing is sent twice


def test_down_failing_and_slow_receivers_lose_nothing(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    """The receiver is down while the run happens, then answers 500, then too slowly, then
    accepts: every event ends up accepted; a repeat only ever follows an attempt the sender
    could not see succeed, and carries the same idempotency key and body."""
    down = f"http://127.0.0.1:{closed_port()}/hook"
    cli = hook_cli(tmp_path, db_url, down, backoff_s=0.01, backoff_max_s=0.01, name="ops")
    result = cli("start", "--cluster", "c1", "--node", "hv1", "--json", env=run_env())
    assert result.code == 0  # delivery trouble never changes the run's exit code
    assert "webhook not delivered yet: ops: event" in result.err
    assert "cannot connect" in result.err
    pending = cli("webhooks", "status", "--json", env=run_env()).json()["targets"]["ops"]
    assert pending["pending"] == 6 and pending["delivered"] == 0
    cli.config.write_text(cli.config.read_text().replace(down, receiver.url), encoding="utf-8")
    receiver.answers.extend([ERROR, ERROR, SLOW])
    codes = [cli("webhooks", "deliver", env=run_env()).code for _ in range(6)]
    assert codes[:3] == [1, 1, 1] and codes[-1] == 0
    accepted = receiver.accepted()
    assert sorted({r.doc["event"] for r in accepted}) == sorted(set(RUN_EVENTS))
    keys = [r.headers["Idempotency-Key"] for r in receiver.received]
    bodies = {}
    for r in receiver.received:
        assert bodies.setdefault(r.headers["Idempotency-Key"], r.body) == r.body
    assert len({r.headers["Idempotency-Key"] for r in accepted}) == 6
    assert len(keys) > 6  # the failed attempts were repeated, with their own keys
    status = cli("webhooks", "status", "--json", env=run_env()).json()["targets"]["ops"]
    assert status["delivered"] == 6 and status["pending"] == 0 and status["failed_attempts"] >= 3


def test_deliveries_are_parked_after_too_many_failures_and_retried(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    """After max_attempts failures a delivery is parked: `webhooks status` shows it with its
    last error, `deliver` no longer tries it, and `webhooks retry` sends it again."""
    cli = hook_cli(
        tmp_path, db_url, receiver.url, events=["run.done"], max_attempts=2, backoff_s=0.01,
        name="ops",
    )  # fmt: skip
    receiver.default = ERROR
    run_id = start(cli)  # attempt 1
    assert cli("webhooks", "deliver", env=run_env()).code == 1  # attempt 2: parked
    status = cli("webhooks", "status", "--json", env=run_env()).json()
    assert status["targets"]["ops"]["parked"] == 1
    (parked,) = status["parked"]
    assert (parked["event"], parked["run_id"], parked["attempts"]) == ("run.done", run_id, 2)
    assert parked["last_error"].startswith("HTTP 500")
    text = cli("webhooks", "status", env=run_env())
    assert "parked: ops event" in text.out and "HTTP 500" in text.out
    before = len(receiver.received)
    assert cli("webhooks", "deliver", env=run_env()).code == 0
    assert len(receiver.received) == before  # parked: not tried
    receiver.default = OK
    retried = cli("webhooks", "retry", "--json", env=run_env())
    assert retried.code == 0, retried.out
    assert (retried.json()["requeued"], retried.json()["sent"]) == (1, 1)
    (done,) = receiver.accepted()
    assert done.doc["event"] == "run.done" and done.doc["event_id"] == parked["event_id"]


def test_the_worker_delivers_continuously(tmp_path: Path, db_url: str, receiver: Receiver) -> None:
    """A run left to the workers is announced by `start --detach` (run.started) and its end
    by the worker that drives it."""
    cli = hook_cli(tmp_path, db_url, receiver.url, events=["run.started", "run.done"])
    detached = cli("start", "--cluster", "c1", "--node", "hv1", "--detach", "--json",
                   env=run_env())  # fmt: skip
    assert detached.code == 3
    assert [r.doc["event"] for r in receiver.accepted()] == ["run.started"]
    worker = cli("worker", "--until-idle", "--poll", "0.1", env=run_env())
    assert worker.code == 0, worker.err
    assert [r.doc["event"] for r in receiver.accepted()] == ["run.started", "run.done"]


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ({"url": "http://x/h", "events": ["run.fail"]},
         "webhooks[0].events[0]: 'run.fail' names no event"),
        ({"url": "http://x/h", "url_env": "U"}, "webhooks[0]: give exactly one of url, url_env"),
        ({"url": "ftp://x/h"}, "webhooks[0].url: must start with http:// or https://"),
        ({"url": "http://x/h", "timeout_s": 0}, "webhooks[0].timeout_s: must be greater than 0"),
        ({"url": "http://x/h", "format": "irc"}, "webhooks[0].format: must be one of json"),
        ({"url": "http://x/h", "colour": 1}, "webhooks[0].colour: unknown key"),
    ],
)  # fmt: skip
def test_bad_webhook_configuration_is_refused_naming_the_key(
    tmp_path: Path, hook: dict[str, object], message: str
) -> None:
    """A webhook entry is validated like every other key: one line naming it, exit 2."""
    cli = make_cli(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", f"webhooks: [{json.dumps(hook)}]")
    result = cli("runs")
    assert result.code == 2
    assert message in result.err, result.err


def test_a_missing_secret_is_named_and_the_run_still_exits_with_its_own_code(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    """The signing secret's variable is not set: the run's exit code stands, one line says
    why nothing was delivered, and `webhooks deliver` fails with exit 2 naming the key."""
    cli = hook_cli(tmp_path, db_url, receiver.url)
    result = cli("start", "--cluster", "c1", "--node", "hv1")
    assert result.code == 0
    assert "webhooks[0].secret_env: environment variable HOOK_SECRET is not set" in result.err
    assert cli("webhooks", "deliver").code == 2
    assert receiver.received == []
    assert cli("webhooks", "deliver", env=run_env()).code == 0
    assert len(receiver.accepted()) == 6


def test_the_cursor_waits_at_a_young_gap_in_event_ids() -> None:
    """PostgreSQL may commit event 12 before event 11: the cursor does not pass a gap until
    the event after it is older than the horizon (a rolled-back insert never fills it)."""
    now = utcnow()

    def event(i: int, age_s: float) -> outbox.OutboxEvent:
        at = now - dt.timedelta(seconds=age_s)
        return outbox.OutboxEvent(i, "r", "w", "s", "transition", None, None, "B", "B", "a", at, {})

    old = now - outbox.GAP_HORIZON
    assert outbox._contiguous(10, [event(11, 1), event(12, 1)], old) == 12
    assert outbox._contiguous(10, [event(12, 1), event(13, 1)], old) == 10
    assert outbox._contiguous(10, [event(11, 1), event(13, 1)], old) == 11
    assert outbox._contiguous(10, [event(12, 600), event(13, 1)], old) == 13


def test_the_commented_example_in_config_example_yaml_is_valid(tmp_path: Path) -> None:
    """The webhooks block of config.example.yaml, uncommented, loads with the values it shows."""
    from workflows import settings

    example = (Path(__file__).resolve().parent.parent / "config.example.yaml").read_text()
    block = example.split("# webhooks:", 1)[1]
    lines = ["webhooks:"] + [line.replace("# ", "", 1) for line in block.splitlines()[1:]]
    config = tmp_path / "c.yaml"
    config.write_text("\n".join(lines), encoding="utf-8")
    (hook,) = settings.load(str(config)).webhooks
    assert (hook.name, hook.url, hook.secret_env, hook.timeout_s, hook.max_attempts) == (
        "ops", "https://hooks.example.com/nodepatch", "NODEPATCH_WEBHOOK_SECRET", 10.0, 10,
    )  # fmt: skip
    assert hook.events == ("run.failed", "run.waiting", "run.done", "run.refused", "cycle.*")


def test_two_deliverers_at_once_send_each_event_once(engine: sa.Engine, receiver: Receiver) -> None:
    """Two processes' deliverers (a worker and a command) flushing at the same moment: each
    delivery is claimed by one of them, so the receiver gets every event exactly once."""
    store = Store(engine)
    for i in range(5):
        store.create_run(
            workflow="node_patch", workflow_version=1, subject=f"c1/hv{i}", state="Preflight",
            params={}, actor="t@h:1",
        )  # fmt: skip
    hook = Receiver_("ops", receiver.url, SECRET, ("run.*",), 2.0, 3, 0.01, 0.01, "json")
    deliverers = [webhooks.Deliverer(outbox.Outbox(engine, webhooks.CONSUMER), [hook])
                  for _ in range(2)]  # fmt: skip
    barrier = threading.Barrier(2)

    def flush(d: webhooks.Deliverer) -> None:
        barrier.wait()
        d.flush()

    threads = [threading.Thread(target=flush, args=(d,)) for d in deliverers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = [r.headers["Idempotency-Key"] for r in receiver.received]
    assert len(keys) == 5 and len(set(keys)) == 5
    assert {r.doc["event"] for r in receiver.received} == {"run.started"}


def test_a_backlog_older_than_a_day_is_not_announced(engine: sa.Engine, receiver: Receiver) -> None:
    """Webhooks first configured on a database whose events are already a day old skip them
    (the cursor moves past them) and send what happens from then on."""
    store = Store(engine)
    old = store.create_run(
        workflow="node_patch", workflow_version=1, subject="c1/hv1", state="Preflight",
        params={}, actor="t@h:1",
    )  # fmt: skip
    hook = Receiver_("ops", receiver.url, None, ("run.*",), 2.0, 3, 0.01, 0.01, "json")
    later = utcnow() + webhooks.BACKLOG_MAX_AGE + dt.timedelta(minutes=1)
    box = outbox.Outbox(engine, webhooks.CONSUMER)
    assert webhooks.Deliverer(box, [hook], now=lambda: later).flush().sent == 0
    new = store.create_run(
        workflow="node_patch", workflow_version=1, subject="c1/hv2", state="Preflight",
        params={}, actor="t@h:1",
    )  # fmt: skip
    assert webhooks.Deliverer(box, [hook]).flush().sent == 1
    assert [r.doc["run_id"] for r in receiver.received] == [new.id]
    assert old.id != new.id
    assert "X-Nodepatch-Signature" not in receiver.received[0].headers  # no secret: unsigned


def test_the_readme_webhook_examples_are_valid(tmp_path: Path) -> None:
    """Every `webhooks:` block the README shows (the full form, Teams and Slack) loads."""
    from workflows import settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    hooks = [b for b in blocks if b.startswith("webhooks:")]
    assert len(hooks) == 2
    formats = set()
    for i, block in enumerate(hooks):
        config = tmp_path / f"{i}.yaml"
        config.write_text(block, encoding="utf-8")
        formats |= {w.format for w in settings.load(str(config)).webhooks}
    assert formats == {"json", "slack", "teams"}
