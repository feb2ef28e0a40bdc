"""The ``portalhub`` command: serve, demo, config show, and user management."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import timedelta

from pydantic import ValidationError

from server.app import create_app, drain
from server.crm.service import Crm
from server.demo import DEFAULT_PASSWORD, seed_demo
from server.directory.models import Password, UserCreate
from server.directory.service import DirectoryService
from server.events.bus import InProcessBus
from server.events.streams import StreamLog
from server.im.check import ImCheck
from server.im.service import ImService
from server.mailbridge.inbox import RawInbox
from server.mailbridge.keys import CodeKeys, KeyProblem
from server.mailbridge.outbox import Outbox
from server.observability import nodes
from server.observability.http import IN_FLIGHT
from server.observability.logs import configure_logging
from server.observability.runtime import OBSERVABILITY
from server.services import SERVICES
from server.settings import ConfigFileError, Settings, describe_errors
from server.store import Store, open_store
from server.store.database import utcnow
from server.store.embedded import EmbeddedDatabaseError
from server.store.files import PRIVATE_UMASK
from server.tasks.counters import TaskCounters
from server.web.limits import LimitedSite, http_runner

log = logging.getLogger("portalhub")
IN_FLIGHT_SECONDS = 30.0  # a draining node waits this long for requests under way


def _directory(store: Store, settings: Settings) -> DirectoryService:
    # The CLI's own bus has no subscribers: the events it writes reach a running server's
    # clients through their streams' history (replay), not live.
    bus = InProcessBus()
    streams = StreamLog(store, bus, retention_seconds=settings.event_retention_seconds)
    directory = DirectoryService(store, streams, bus)
    # Workgroups made here (the demo's) get their chat as they do through the API.
    directory.workgroup_hooks.append(ImService(store, streams, directory, bus, settings))
    return directory


# The collector's youngest generation is collected every GC_THRESHOLDS[0] allocations (Python's
# default is 700). In a connect burst 50 connects are under way at any moment, their reads,
# snapshots and frames alive: collected that often, they were found alive, moved on, and
# about two full passes (8-42 ms each, every connection stopped) ran per series of 1,000
# connects. A connect with history makes more of them (27-47 chats): the collector took
# 102-125 ms of a series with history against 34-78 ms on the empty history; with 10,000,
# 16-57 ms and 9-23 ms (fewer, larger passes; docs/benchmarks.md, 2026-12-07 18:23-18:50).
GC_THRESHOLDS = (10_000, 10, 10)


def print_logins(logins: list[tuple[str, str]], password: str) -> None:
    print(f"Demo logins (password: {password}):")
    for login, position in logins:
        print(f"  {login:<8} {position}")


async def serve(settings: Settings, demo: bool, demo_password: str | None) -> None:
    # Whatever the hub writes (database, keys, mail) is for its own user only.
    os.umask(PRIVATE_UMASK)
    async with open_store(settings, reuse_running=False) as store:
        app = create_app(settings, store)
        runner = http_runner(app, settings, handle_signals=False)
        await runner.setup()
        try:
            if demo:  # before listening, so that "ready" means the demo logins work
                svc = app[SERVICES]
                logins = await seed_demo(store, svc.directory, demo_password, svc.crm)
                print_logins(logins, demo_password or DEFAULT_PASSWORD)
            site = LimitedSite(
                runner, settings.host, settings.http_port, settings.http_max_connections_per_address
            )
            # What start-up made (modules, the app, the demo: about 100,000 objects) lives as
            # long as the process; frozen, the collector's full passes no longer walk it, so
            # they pause every connection for a fraction of the time (a full pass of a hub
            # with 1,000 connections took 95-190 ms). Collected first, before anyone is
            # served: frozen garbage would never be freed.
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            await site.start()
            xmpp = app[SERVICES].xmpp
            if xmpp is not None:
                print(
                    f"XMPP (Jabber) on port {xmpp.ports['starttls']} (STARTTLS) and "
                    f"{xmpp.ports['tls']} (SSL/direct TLS) for domain {settings.domain}; "
                    f"certificate SHA-256 fingerprint {xmpp.fingerprint}",
                    flush=True,
                )
            mail_ports = app[SERVICES].mail.ports
            if mail_ports:
                listeners = ", ".join(f"{k.upper()} port {v}" for k, v in mail_ports.items())
                print(
                    f"CRM mail for {app[SERVICES].mail.address} accepted on {listeners}",
                    flush=True,
                )
            host, port = runner.addresses[0][:2]
            app[OBSERVABILITY].listening(host, port)  # for the node registry
            print(f"Portal Hub is running at http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
            signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, signals.put_nowait, sig)
            grace = settings.drain_grace_seconds
            if await signals.get() == signal.SIGTERM and grace > 0:
                # Readiness fails at once so that load balancers send no new clients; until
                # they have noticed, this node keeps serving. A second signal cuts it short.
                app[SERVICES].hub.draining = True
                print(f"draining: /readyz answers 503 for {grace:g} s", flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signals.get(), grace)
            print("stopping...", flush=True)
            await site.stop()  # no new connections
            await drain(app)  # clients are told to reconnect elsewhere
            # Requests under way finish here: once aiohttp's shutdown starts, it stops reading
            # from their connections, so a body still arriving would never be read.
            if not await IN_FLIGHT.wait_idle(IN_FLIGHT_SECONDS):
                print(f"{IN_FLIGHT.count} requests still under way; stopping anyway", flush=True)
        finally:
            await runner.cleanup()


def _crm(store: Store, settings: Settings) -> tuple[Crm, ImService]:
    bus = InProcessBus()
    streams = StreamLog(store, bus, retention_seconds=settings.event_retention_seconds)
    directory = _directory(store, settings)
    im = ImService(store, streams, directory, bus, settings)
    return Crm.build(settings, store, streams, bus, directory, im), im


async def demo_command(settings: Settings, password: str | None) -> None:
    async with open_store(settings, reuse_running=True) as store:
        crm, im = _crm(store, settings)
        logins = await seed_demo(store, _directory(store, settings), password, crm)
        await crm.counters.settled()
        await im.close()  # the notices' bookkeeping is written before we exit
    print_logins(logins, password or DEFAULT_PASSWORD)


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise SystemExit("passwords do not match")
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(Password).validate_python(password)
    except ValidationError:
        raise SystemExit("a password needs 8 to 1024 characters") from None


async def user_add(settings: Settings, args: argparse.Namespace, password: str) -> None:
    async with open_store(settings, reuse_running=True) as store:
        directory = _directory(store, settings)
        department_id = None
        if args.department:
            dept = await store.departments.find_one(
                {"$or": [{"_id": args.department}, {"name": args.department}]}
            )
            if dept is None:
                raise SystemExit(f"no department {args.department!r}")
            department_id = str(dept["_id"])
        try:
            given = {"first_name": args.first_name, "last_name": args.last_name}
            data = UserCreate(
                login=args.login,
                email=args.email,
                password=password,
                department_id=department_id,
                is_admin=args.admin,
                **{k: v for k, v in given.items() if v is not None},
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "user"
            raise SystemExit(f"invalid {where}: {error['msg']}") from None
        from server.web.problems import Problem

        try:
            user = await directory.create_user(data)
        except Problem as problem:
            raise SystemExit(str(problem)) from None
    print(f"created user {user.login} ({user.id})")


async def user_list(settings: Settings) -> None:
    async with open_store(settings, reuse_running=True) as store:
        async for doc in store.users.find({}, sort=[("login", 1)]):
            flags = ",".join(
                f
                for f, on in (
                    ("admin", doc.get("is_admin")),
                    ("external", doc.get("is_external")),
                    ("inactive", not doc.get("is_active", True)),
                )
                if on
            )
            name = f"{doc.get('first_name', '')} {doc.get('last_name', '')}".strip()
            print(f"{doc['login']:<16} {doc.get('email', ''):<32} {name:<24} {flags}")


async def user_passwd(settings: Settings, login: str, password: str) -> None:
    async with open_store(settings, reuse_running=True) as store:
        directory = _directory(store, settings)
        user = await directory.user_by_login(login)
        if user is None:
            raise SystemExit(f"no user {login!r}")
        await directory.set_password(str(user["_id"]), password)
        await directory.revoke_tokens(str(user["_id"]), "password_changed")
    print(f"password of {login} changed; their sessions were ended")


async def counters_check(settings: Settings, repair: bool, as_json: bool) -> bool:
    """Recount every user's CRM counters from the activities, the messenger's unread
    numbers from the messages and the stored task counters from the tasks; True when
    nothing differed."""
    async with open_store(settings, reuse_running=True) as store:
        crm, _ = _crm(store, settings)
        started = time.perf_counter()
        report = await crm.counters.check(repair=repair)
        elapsed = time.perf_counter() - started
        started = time.perf_counter()
        im_report = await ImCheck(store).check(repair=repair)
        im_elapsed = time.perf_counter() - started
        started = time.perf_counter()
        task_counters = TaskCounters(store, InProcessBus(), settings)
        task_report = await task_counters.check(repair=repair)
        await task_counters.close()
        task_elapsed = time.perf_counter() - started
    task_summary = {
        "users": task_report.users_checked,
        "users_busy": task_report.users_busy,
        "repaired": task_report.repaired,
        "seconds": round(task_elapsed, 3),
    }
    task_differences = {
        user_id: {"stored": before, "counted": after}
        for user_id, (before, after) in task_report.differences.items()
    }
    im_summary = {**im_report.summary(), "seconds": round(im_elapsed, 3)}
    summary = {
        "users": report.users_checked,
        "open_activities": report.activities_checked,
        "users_with_differences": len(report.counter_differences),
        "stale_activities": report.stale_activities,
        "stale_records": report.stale_records,
        "repaired": report.repaired,
        "seconds": round(elapsed, 3),
    }
    if as_json:
        im = {
            **im_summary,
            "chat_differences": im_report.chat_differences,
            "member_differences": im_report.member_differences,
            "unread_differences": im_report.unread_differences,
        }
        tasks = {**task_summary, "differences": task_differences}
        print(
            json.dumps(
                {**summary, "differences": report.counter_differences, "im": im, "tasks": tasks},
                indent=2,
            )
        )
    else:
        print(
            f"checked {summary['users']} users, {summary['open_activities']} open activities "
            f"in {summary['seconds']} s"
        )
        for user_id, delta in sorted(report.counter_differences.items()):
            print(f"  user {user_id}: stored numbers differ: {json.dumps(delta)}")
        if report.stale_activities or report.stale_records:
            print(
                f"  {report.stale_activities} activities and {report.stale_records} records "
                "carried stale copies of counted fields"
            )
        if report.clean:
            print("counters are correct")
        elif repair:
            print(
                "repaired; clients connected to a running hub see the new numbers when they "
                "reconnect (POST /api/v1/crm/counters/check with repair pushes them at once)"
            )
        else:
            print("run with --repair to fix")
        print(
            f"messenger: checked {im_summary['messages']} messages in {im_summary['chats']} "
            f"chats, {im_summary['memberships']} memberships in {im_summary['seconds']} s"
        )
        for chat_id, delta in sorted(im_report.chat_differences.items()):
            print(f"  chat {chat_id}: stored numbers differ: {json.dumps(delta)}")
        for member, delta in sorted(im_report.member_differences.items()):
            print(f"  membership {member}: read position differs: {json.dumps(delta)}")
        for user_id, chats in sorted(im_report.unread_differences.items()):
            print(f"  user {user_id}: unread [maintained, recounted]: {json.dumps(chats)}")
        if im_report.clean:
            print("unread numbers are correct")
        elif repair:
            print("repaired; running hubs read them within PORTALHUB_CACHE_TTL_SECONDS")
        else:
            print("run with --repair to fix")
        print(
            f"tasks: checked the stored task counters of {task_summary['users']} users "
            f"in {task_summary['seconds']} s"
        )
        for user_id, found in sorted(task_differences.items()):
            print(f"  user {user_id}: stored task counters differ: {json.dumps(found)}")
        if task_report.clean:
            print("task counters are correct")
        elif repair:
            print(
                "repaired; running hubs read them within PORTALHUB_CACHE_TTL_SECONDS, clients "
                "at their next task change or connect"
            )
        else:
            print("run with --repair to fix")
    return (report.clean and im_report.clean and task_report.clean) or repair


async def mail_keys(settings: Settings, action: str, kid: str | None) -> None:
    """List, rotate or retire the secrets that sign reply codes (shared by every node)."""
    async with open_store(settings, reuse_running=True) as store:
        keys = CodeKeys(store)
        try:
            if action == "rotate":
                print(f"key {await keys.rotate()} is now current; older keys keep verifying")
            elif action == "retire":
                assert kid is not None
                await keys.retire(kid)
                print(f"key {kid.upper()} retired: codes signed with it no longer verify")
        except KeyProblem as exc:
            raise SystemExit(str(exc)) from None
        for info in await keys.describe():
            state = "current" if info.current else "retired" if info.retired else "verifying"
            print(f"{info.id}  {info.created_at:%Y-%m-%d %H:%M}  {state}")


async def mail_prune(settings: Settings, days: int | None) -> None:
    keep = days or settings.mail_retention_days
    async with open_store(settings, reuse_running=True) as store:
        cutoff = utcnow() - timedelta(days=keep)
        incoming = await RawInbox(store).prune(cutoff)
        outgoing = await Outbox(store, None).prune(cutoff)
    print(
        f"dropped the bytes of {incoming} received and {outgoing} sent mails older than {keep} days"
    )


async def status(settings: Settings, as_json: bool) -> None:
    """The running hubs, from the node registry they write every few seconds."""
    async with open_store(settings, reuse_running=True) as store:
        print(await nodes.status_report(store, as_json))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portalhub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the hub")
    serve_p.add_argument(
        "--demo",
        action="store_true",
        help="seed the demo company on first start and print its logins",
    )
    serve_p.add_argument("--password", help="with --demo: one password for all demo users")
    serve_p.add_argument("--host")
    serve_p.add_argument("--port", type=int)
    demo_p = sub.add_parser("demo", help="seed the demo company (idempotent)")
    demo_p.add_argument("--password", help="one password for all demo users")
    config_p = sub.add_parser("config", help="configuration")
    config_sub = config_p.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("show", help="print the effective settings, secrets masked")
    user_p = sub.add_parser("user", help="manage users")
    user_sub = user_p.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="create a user")
    add.add_argument("login")
    add.add_argument("--email", required=True)
    add.add_argument("--first-name")
    add.add_argument("--last-name")
    add.add_argument("--admin", action="store_true")
    add.add_argument("--department", help="department id or name")
    add.add_argument("--password-stdin", action="store_true")
    user_sub.add_parser("list", help="list users")
    passwd = user_sub.add_parser("passwd", help="set a user's password")
    passwd.add_argument("login")
    passwd.add_argument("--password-stdin", action="store_true")
    counters_p = sub.add_parser("counters", help="CRM counters, unread messages, task counters")
    counters_sub = counters_p.add_subparsers(dest="counters_command", required=True)
    check = counters_sub.add_parser(
        "check",
        help="recount everyone's CRM counters from the activities, unread messages from "
        "the messages and stored task counters from the tasks; exit 1 on drift",
    )
    check.add_argument("--repair", action="store_true", help="write the recounted numbers")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    mail_p = sub.add_parser("mail", help="the mail bridge")
    mail_sub = mail_p.add_subparsers(dest="mail_command", required=True)
    keys_p = mail_sub.add_parser("keys", help="the secrets that sign reply codes")
    keys_p.add_argument(
        "action",
        nargs="?",
        choices=("list", "rotate", "retire"),
        default="list",
        help="rotate: a new current key (older ones keep verifying); retire KEY: stop one",
    )
    keys_p.add_argument("key", nargs="?", help="with retire: the key id")
    prune_p = mail_sub.add_parser(
        "prune", help="drop stored bytes of processed mail (the hub also does this daily)"
    )
    prune_p.add_argument(
        "--days", type=int, help="keep this many days (default: PORTALHUB_MAIL_RETENTION_DAYS)"
    )
    status_p = sub.add_parser("status", help="the cluster's nodes and their load")
    status_p.add_argument("--json", action="store_true", help="machine-readable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        for line in describe_errors(exc):
            print(f"portalhub: {line}", file=sys.stderr)
        return 2
    except ConfigFileError as exc:
        print(f"portalhub: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        updates = {k: v for k, v in (("host", args.host), ("http_port", args.port)) if v}
        if updates:
            settings = settings.model_copy(update=updates)
    configure_logging(settings.log_level, settings.log_format)
    try:
        run_command(args, settings)
    except EmbeddedDatabaseError as exc:
        print(f"portalhub: embedded database: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"portalhub: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run_command(args: argparse.Namespace, settings: Settings) -> None:
    if args.command == "serve":
        asyncio.run(serve(settings, args.demo, args.password))
    elif args.command == "demo":
        asyncio.run(demo_command(settings, args.password))
    elif args.command == "config":
        print(json.dumps(settings.masked(), indent=2))
    elif args.command == "mail" and args.mail_command == "keys":
        if args.action == "retire" and not args.key:
            raise SystemExit("portalhub mail keys retire: which key? (see portalhub mail keys)")
        asyncio.run(mail_keys(settings, args.action, args.key))
    elif args.command == "mail":
        asyncio.run(mail_prune(settings, args.days))
    elif args.command == "status":
        asyncio.run(status(settings, args.json))
    elif args.command == "counters":
        if not asyncio.run(counters_check(settings, args.repair, args.json)):
            raise SystemExit(1)
    elif args.user_command == "add":
        password = read_password(args.password_stdin)
        asyncio.run(user_add(settings, args, password))
    elif args.user_command == "list":
        asyncio.run(user_list(settings))
    elif args.user_command == "passwd":
        password = read_password(args.password_stdin)
        asyncio.run(user_passwd(settings, args.login, password))


if __name__ == "__main__":
    raise SystemExit(main())
