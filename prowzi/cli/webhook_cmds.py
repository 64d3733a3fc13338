"""``prowzi webhooks list|show|redeliver|test|deliver``: the delivery log and its outbox."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from prowzi.cli._common import fail, load_config, user_errors

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig
    from prowzi.webhooks.outbox import Outbox

webhooks_app = typer.Typer(
    help="Webhook deliveries: the log, redelivery, a test delivery.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def register(app: typer.Typer) -> None:
    app.add_typer(webhooks_app, name="webhooks")


def _outbox(config: ProwziConfig) -> Outbox:
    from prowzi.storage.remote import open_store
    from prowzi.webhooks.outbox import Outbox

    return Outbox(open_store(config.webhook_outbox_location, durable=config.checkpoint_fsync))


def _when(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("v", "name")}


@webhooks_app.command("list")
def list_deliveries(
    session: Annotated[str | None, typer.Option(help="Only this session's deliveries.")] = None,
    pending: Annotated[bool, typer.Option("--pending", help="Only pending deliveries.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Show the latest N.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """The delivery log: pending, delivered, failed and disabled deliveries, oldest first."""
    config = load_config()
    with user_errors():
        import orjson

        from prowzi.ids import validate_session_id

        if session is not None:
            validate_session_id(session)
        rows = _outbox(config).records(session_id=session)
        if pending:
            rows = [r for r in rows if r["outcome"] == "pending"]
        rows = rows[-limit:]
        if as_json:
            for row in rows:
                typer.echo(orjson.dumps({**_public(row), "body": None}).decode())
            return
        if not rows:
            typer.echo("no webhook deliveries")
            return
        typer.echo(
            f"{'id':<28} {'type':<17} {'session':<28} {'outcome':<9} {'tries':>5}  "
            f"{'created (UTC)':<19}  last"
        )
        for row in rows:
            last = row.get("last_error") or (
                str(row["last_status"]) if row.get("last_status") else ""
            )
            typer.echo(
                f"{row['id']:<28} {row['type']:<17} {row['session_id']:<28} "
                f"{row['outcome']:<9} {row.get('attempts', 0):>5}  "
                f"{_when(row.get('created_at')):<19}  {last}"
            )


@webhooks_app.command("show")
def show(
    message_id: Annotated[str, typer.Argument(help="The delivery's webhook-id (msg_...).")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False,
) -> None:
    """One delivery: every record of it (redeliveries too) and its payload."""
    config = load_config()
    with user_errors():
        import orjson

        found = _outbox(config).find(message_id)
        if not found:
            fail(f"no webhook delivery {message_id}")
        if as_json:
            typer.echo(orjson.dumps([_public(r) for r in found]).decode())
            return
        for record in found:
            typer.echo(f"{record['id']}  {record['type']}  session {record['session_id']}")
            typer.echo(f"  endpoint:  {record['endpoint']}")
            typer.echo(f"  outcome:   {record['outcome']} after {record['attempts']} attempt(s)")
            typer.echo(f"  created:   {_when(record.get('created_at'))} UTC")
            if record.get("finished_at"):
                typer.echo(f"  finished:  {_when(record['finished_at'])} UTC")
            if record["outcome"] == "pending" and record.get("next_attempt_at"):
                typer.echo(f"  next try:  {_when(record['next_attempt_at'])} UTC")
            if record.get("last_status") or record.get("last_error"):
                typer.echo(
                    f"  last:      {record.get('last_status') or '-'} "
                    f"{record.get('last_error') or ''}".rstrip()
                )
        body = orjson.loads(found[-1]["body"])
        typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())


@webhooks_app.command("redeliver")
def redeliver(
    message_id: Annotated[str, typer.Argument(help="The delivery's webhook-id (msg_...).")],
) -> None:
    """Send a delivery again (same webhook-id, after the endpoint's pending ones)."""
    config = load_config()
    with user_errors():
        from prowzi.webhooks import webhooks_for

        webhooks = webhooks_for(config)
        try:
            entry = webhooks.outbox.redeliver(message_id)
        except LookupError as exc:
            fail(str(exc))
        webhooks.deliverer.added([entry])
        left = webhooks.deliverer.drain([entry.name], config.webhook_drain_seconds)
        if left:
            typer.echo(f"{message_id}: queued (still pending; `prowzi webhooks show {message_id}`)")
        else:
            outcome = webhooks.outbox.find(message_id)[-1]["outcome"]
            typer.echo(f"{message_id}: {outcome}")
            if outcome != "delivered":
                raise typer.Exit(1)


@webhooks_app.command("deliver")
def deliver(
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to keep delivering (default: drain setting).")
    ] = -1.0,
) -> None:
    """Deliver what is pending in the outbox (what earlier processes left), then exit."""
    config = load_config()
    with user_errors():
        from prowzi.webhooks import webhooks_for

        webhooks = webhooks_for(config)
        timeout = config.webhook_drain_seconds if wait < 0 else wait
        names = webhooks.outbox.pending_names()
        deadline = time.monotonic() + timeout
        while not webhooks.deliverer.holds_lease and time.monotonic() < deadline:
            time.sleep(0.05)
        left = webhooks.deliverer.drain(names, max(0.0, deadline - time.monotonic()))
        typer.echo(f"{len(names) - len(left)} delivered or given up, {len(left)} pending")


@webhooks_app.command("enable")
def enable(
    endpoint: Annotated[str, typer.Argument(help="The endpoint id (see `list --json`).")],
) -> None:
    """Deliver to an endpoint again after it answered 410 Gone (what it missed stays in the
    log: send it with `redeliver`)."""
    config = load_config()
    with user_errors():
        outbox = _outbox(config)
        if not outbox.endpoint_state(endpoint).get("disabled"):
            fail(f"endpoint {endpoint} is not disabled")
        outbox.set_disabled(endpoint, False)
        typer.echo(f"{endpoint}: enabled")


@webhooks_app.command("test")
def test(
    endpoint: Annotated[
        str | None, typer.Option(help="Only this endpoint id (see `list`); default: every one.")
    ] = None,
) -> None:
    """Send a signed `webhook.test` event to each subscribed endpoint now, and say how it went."""
    config = load_config()
    with user_errors():
        from prowzi.webhooks import Webhooks, require_sending
        from prowzi.webhooks.delivery import new_client, send
        from prowzi.webhooks.outbox import new_message_id
        from prowzi.webhooks.payload import encode_payload, test_payload

        require_sending()
        subscriptions = Webhooks(config).subscriptions()
        if endpoint is not None:
            subscriptions = {k: v for k, v in subscriptions.items() if k == endpoint}
        if not subscriptions:
            fail("no webhook subscription: set PROWZI_WEBHOOK_URL or PROWZI_WEBHOOKS", 2)
        failed = 0
        with new_client(config.webhook_timeout_seconds) as client:
            for subscription in subscriptions.values():
                result = send(
                    client,
                    subscription,
                    new_message_id(),
                    encode_payload(test_payload()),
                    allow_private=config.webhook_allow_private,
                )
                ok = result.outcome == "ok"
                failed += not ok
                what = f"HTTP {result.status}" if ok else result.error
                typer.echo(
                    f"{subscription.id} {subscription.url}: {'ok' if ok else 'failed'} "
                    f"({what}, {result.seconds * 1000:.0f} ms)"
                )
        if failed:
            raise typer.Exit(1)
