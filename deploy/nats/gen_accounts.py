#!/usr/bin/env python3
"""Writes deploy/nats/accounts.conf: wangge's accounts, users and per-role permissions.

Run it after changing a role's subjects or the list of departments, and commit the result
(`python3 deploy/nats/gen_accounts.py`). The config is generated because per-stream JetStream
API permissions repeat a dozen subjects per stream and per role, which is easy to get subtly
wrong by hand. Departments are the ids of config/cities/*/routing.toml (the same 15 in every
city shipped today); `crates/wangge/tests/deploy_permissions.rs` checks that every department
of every city has a console user here.

Passwords are never in the file: each user's password is an environment variable
(`$WANGGE_NATS_PASS_<USER>`) that nats-server resolves at start. Put a bcrypt hash there in
production (`nats server passwd`), a random string in tests. A missing variable stops the
server at start-up, so no user is ever left without a password.
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = pathlib.Path(__file__).resolve().parent / "accounts.conf"

# Event streams and the JetStream-side names every role refers to.
EVENT_STREAMS = ["GRIDS", "INCIDENTS", "INTAKE", "SUBMISSIONS", "NOTIFICATIONS"]


def departments():
    ids = set()
    for routing in sorted((ROOT / "config/cities").glob("*/routing.toml")):
        ids.update(re.findall(r'^id = "([a-z0-9_]+)"', routing.read_text(), re.M))
    return sorted(ids)


def stream_read(stream):
    """Read a stream: info, direct/message get, ephemeral or named consumers, acks."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def stream_own(stream):
    """A stream the role creates (idempotently, at start) and reads."""
    return [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"] + stream_read(stream)


def kv_own(bucket):
    return stream_own(f"KV_{bucket}") + [f"$KV.{bucket}.>"]


def inbox(user):
    return f"_INBOX_{user}.>"


def own_inbox(user):
    """Services publish to their own inbox once at start: a request nobody answers is the
    round trip that proves their subscriptions are registered (eventstore::bus)."""
    return [inbox(user)]


def block(name, publish, subscribe, deny_publish=(), deny_subscribe=(), responses=False):
    """A role, rendered by `render` once every role is known (see `answer_callers`)."""
    return {
        "name": name,
        "publish": list(publish),
        "subscribe": list(subscribe),
        "deny_publish": list(deny_publish),
        "deny_subscribe": list(deny_subscribe),
        "responses": responses,
    }


def render(role):
    def lst(items):
        return "[\n" + "".join(f'        "{item}"\n' for item in items) + "      ]"

    text = f"    {role['name']} = {{\n      publish: {{ allow: {lst(role['publish'])}"
    if role["deny_publish"]:
        text += f", deny: {lst(role['deny_publish'])}"
    text += f" }}\n      subscribe: {{ allow: {lst(role['subscribe'])}"
    if role["deny_subscribe"]:
        text += f", deny: {lst(role['deny_subscribe'])}"
    text += " }\n"
    if role["responses"]:
        # May answer requests it received (one reply each, within the server's default expiry)
        # without a general publish permission on anyone's inbox.
        text += "      allow_responses: true\n"
    return text + "    }\n"


def subjects_overlap(left, right):
    """Whether some subject matches both patterns (`*` one token, `>` the rest)."""
    left, right = left.split("."), right.split(".")
    for a, b in zip(left, right):
        if a == ">" or b == ">":
            return True
        if a != b and a != "*" and b != "*":
            return False
    return len(left) == len(right)


def answer_callers(roles, user_roles, user_inboxes):
    """Gives each role that answers requests (`allow_responses`) an explicit publish right on
    the inbox of every user whose role may send it one.

    WHY: `allow_responses` is granted by the server node that delivered the request. A
    service that reconnects to another node of a cluster between a request and its reply
    (a node restarted, a leader moved) has its reply refused there ("Permissions Violation
    for Publish to _INBOX_resident..."), and the caller times out although the work was done.
    The explicit right holds on every node. It is no wider than what the service needs: the
    inboxes of the users that may ask it something, never another service's.
    """
    by_name = {role["name"]: role for role in roles}
    for role in roles:
        if not role["responses"]:
            continue
        requests = [subject for subject in role["subscribe"]
                    if not subject.startswith("_INBOX") and not subject.startswith("$")]
        callers = []
        for user, role_name in user_roles:
            caller = by_name[role_name]
            if caller is role:
                continue
            if any(subjects_overlap(published, request)
                   for published in caller["publish"] for request in requests):
                callers.append(inbox(user_inboxes[user]))
        role["publish"] += sorted(set(callers) - set(role["publish"]))


def main():
    depts = departments()
    srv = ["$SRV.>"]  # NATS micro-service discovery: PING, INFO, STATS
    roles = []
    users = []

    user_roles = []  # (user, role), in order

    def user(name, perms):
        env = "WANGGE_NATS_PASS_" + name.upper().replace("-", "_")
        users.append(f'      {{ user: "{name}", password: ${env}, permissions: ${perms} }}\n')
        user_roles.append((name, perms))

    # Services: their own subjects and streams, nothing else.
    roles.append(block(
        "REGISTRY",
        ["grids.ev.>", "$JS.API.INFO"] + own_inbox("registry") + stream_own("GRIDS"),
        ["grids.locate", "grids.cmd.*", "grids.query.>", inbox("registry")] + srv,
        responses=True,
    ))
    user("registry", "REGISTRY")
    roles.append(block(
        "INTAKE",
        ["incidents.ev.>", "intake.ev.>", "intake.receipts.>", "incidents.status.>", "$JS.API.INFO"]
        + own_inbox("intake") + stream_read("GRIDS") + stream_own("INCIDENTS") + stream_own("INTAKE")
        + stream_own("SUBMISSIONS") + kv_own("INTAKE_CONTACTS"),
        ["intake.request", "intake.query.>", "incidents.query.>", "intake.contact.erase",
         inbox("intake")] + srv,
        responses=True,
    ))
    user("intake", "INTAKE")
    roles.append(block(
        "DISPATCH",
        ["incidents.ev.>", "incidents.status.>", "dispatch.notify.>", "$JS.API.INFO"] + own_inbox("dispatch")
        + stream_own("INCIDENTS") + stream_own("NOTIFICATIONS") + kv_own("DISPATCH_SNAPSHOTS"),
        ["dispatch.cmd.>", inbox("dispatch")] + srv,
        responses=True,
    ))
    user("dispatch", "DISPATCH")
    # The projection builder owns its read-model buckets, whose names it chooses (rebuilds
    # create fresh buckets and swap): broad JetStream rights, but it may not write, change or
    # remove an event stream. Its builder lease is the key `builder` of its own meta bucket
    # PROJECTION (create / revision-checked update / delete through $KV.PROJECTION.builder,
    # reads through the bucket's direct get): nothing beyond these rights.
    # dispatch's shared notifier consumer (dispatch::service::NOTIFIER_DURABLE) on INCIDENTS:
    # no one but dispatch pulls from, acks on or deletes it.
    notifier_protected = [
        "$JS.API.CONSUMER.MSG.NEXT.INCIDENTS.dispatch-notifier",
        "$JS.API.CONSUMER.DELETE.INCIDENTS.dispatch-notifier",
        "$JS.ACK.INCIDENTS.dispatch-notifier.>",
    ]
    protect = []
    for stream in EVENT_STREAMS:
        for op in ["CREATE", "UPDATE", "DELETE", "PURGE", "MSG.DELETE"]:
            protect.append(f"$JS.API.STREAM.{op}.{stream}")
    # Nor may it touch the other services' state: intake's contact bucket (residents' personal
    # data) and dispatch's snapshots, nor pull from, ack on or delete the shared work
    # consumers: of SUBMISSIONS (intake's), of NOTIFICATIONS (the consoles'), and dispatch's
    # notifier on INCIDENTS (by name: the projection reads INCIDENTS through its own).
    foreign_buckets = ["INTAKE_CONTACTS", "DISPATCH_SNAPSHOTS"]
    for bucket in foreign_buckets:
        stream = f"KV_{bucket}"
        protect += [
            f"$JS.API.STREAM.*.{stream}",
            f"$JS.API.STREAM.MSG.*.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.CONSUMER.*.{stream}",
            f"$JS.API.CONSUMER.*.{stream}.>",
            f"$JS.API.CONSUMER.*.*.{stream}.>",
            f"$KV.{bucket}.>",
        ]
    for stream in ["SUBMISSIONS", "NOTIFICATIONS"]:
        protect += [
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
            f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.ACK.{stream}.>",
        ]
    protect += notifier_protected
    roles.append(block(
        "PROJECTION",
        ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>"] + own_inbox("projection"),
        ["projection.>", "$KV.>", inbox("projection")] + srv,
        deny_publish=protect,
        deny_subscribe=[f"$KV.{bucket}.>" for bucket in foreign_buckets],
        responses=True,
    ))
    user("projection", "PROJECTION")

    # Resident apps: submit reports (core publish or JetStream publish on intake.submit.*),
    # ask for a receipt or an incident's public status by id, and which grid covers a place
    # before submitting (`grids.locate`), all request/reply on their own inbox. They may subscribe to nothing but their inbox: no receipts, status changes or
    # notifications broadcast to others, and no JetStream API at all.
    roles.append(block(
        "RESIDENT_APP",
        ["intake.submit.*", "intake.request", "intake.query.receipt", "incidents.query.get",
         "grids.locate"],
        [inbox("resident")],
    ))
    user("resident-app", "RESIDENT_APP")

    # Department consoles: commands in their own department's scope, their own
    # notifications through one durable consumer named console-<id> whose filter is pinned in
    # the API subject (the server checks the filter in the subject against the request), and
    # the read-only queries a console shows (its board, an incident by id).
    for dept in depts:
        consumer = f"console-{dept}"
        roles.append(block(
            f"CONSOLE_{dept.upper()}",
            [
                f"dispatch.cmd.department.{dept}.>",
                "projection.query.*",
                "incidents.query.get",
                "grids.locate",
                "$JS.API.INFO",
                "$JS.API.STREAM.INFO.NOTIFICATIONS",
                f"$JS.API.CONSUMER.CREATE.NOTIFICATIONS.{consumer}.dispatch.notify.department.{dept}",
                f"$JS.API.CONSUMER.INFO.NOTIFICATIONS.{consumer}",
                f"$JS.API.CONSUMER.MSG.NEXT.NOTIFICATIONS.{consumer}",
                f"$JS.ACK.NOTIFICATIONS.{consumer}.>",
            ],
            [inbox(f"console_{dept}"), f"dispatch.notify.department.{dept}"],
        ))
        user(f"console-{dept}", f"CONSOLE_{dept.upper()}")

    # Office consoles: one user for each kind of office on the whistle ladder (街道 street,
    # 社区 community, 网格员 grid worker, 区 district, 市 city). Commands in that role's scope;
    # the notifications of every office of that kind, each office through a durable consumer
    # it names itself (`<kind>-<office code>`, e.g. `street-350404002`) whose filter is pinned
    # to the kind in the API subject. Which office of the kind a console speaks for is not
    # bound by the server (deploy/README.md, "Not enforced by the server"). A consumer name
    # cannot be pinned by prefix in a NATS permission, so the department consoles' consumers
    # are denied by name; another kind's office consumer is not (and `console_consumer`
    # refuses to read one whose filter is not its office's).
    offices = [
        # (user, command scope, notification subject kind)
        ("console-street", "street", "street"),
        ("console-community", "community", "community"),
        ("console-grid-worker", "grid_worker", "grid"),
        ("console-district", "district", "district"),
        ("console-city", "city", "city"),
    ]
    named_consumers = [f"console-{dept}" for dept in depts]
    for name, scope, kind in offices:
        role = name.upper().replace("-", "_")
        roles.append(block(
            role,
            [
                f"dispatch.cmd.{scope}.>",
                "projection.query.*",
                "incidents.query.get",
                "grids.locate",
                "$JS.API.INFO",
                "$JS.API.STREAM.INFO.NOTIFICATIONS",
                f"$JS.API.CONSUMER.CREATE.NOTIFICATIONS.*.dispatch.notify.{kind}.*",
                "$JS.API.CONSUMER.INFO.NOTIFICATIONS.*",
                "$JS.API.CONSUMER.MSG.NEXT.NOTIFICATIONS.*",
                "$JS.ACK.NOTIFICATIONS.*.>",
            ],
            [inbox(name.replace("-", "_")), f"dispatch.notify.{kind}.*"],
            deny_publish=[
                subject
                for consumer in named_consumers
                for subject in (
                    f"$JS.API.CONSUMER.CREATE.NOTIFICATIONS.{consumer}.>",
                    f"$JS.API.CONSUMER.INFO.NOTIFICATIONS.{consumer}",
                    f"$JS.API.CONSUMER.MSG.NEXT.NOTIFICATIONS.{consumer}",
                    f"$JS.ACK.NOTIFICATIONS.{consumer}.>",
                )
            ],
        ))
        user(name, role)

    # Auditors: read every stream through ephemeral consumers and direct gets; no writes, no
    # stream changes, no durable consumers, and no pulls from (or deletes of) the services'
    # shared work consumers. They may delete a consumer by name (their replays remove their
    # ephemeral consumers); the services' private consumers have unguessable names
    # (<instance>-<UUIDv7>) and auditors may not list consumers.
    # ... and they may query the read models (`projection.query.*`, request/reply).
    auditor_publish = [
        "$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST", "projection.query.*",
    ]
    for stream in EVENT_STREAMS:
        auditor_publish += [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            # the bare form only creates ephemeral consumers (a durable name is refused)
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.API.CONSUMER.DELETE.{stream}.*",
            f"$JS.FC.{stream}.>",
        ]
    roles.append(block(
        "AUDITOR",
        auditor_publish,
        [inbox("auditor")],
        deny_publish=[
            *notifier_protected,
            # the department consoles' notification consumers (an office console's name is
            # its own choice and cannot be listed here: deploy/README.md)
            *(f"$JS.API.CONSUMER.{op}.NOTIFICATIONS.{consumer}"
              for consumer in named_consumers for op in ("MSG.NEXT", "DELETE")),
            "$JS.API.CONSUMER.MSG.NEXT.SUBMISSIONS.*",
            "$JS.API.CONSUMER.DELETE.SUBMISSIONS.*",
        ],
    ))
    user("auditor", "AUDITOR")

    # The personal-information office: erases a reporter's contact details on request
    # (`intake.contact.erase`, request/reply; intake records the erasure on INTAKE before it
    # erases). Nothing else: it reads no stream, and no other client may erase.
    roles.append(block(
        "PRIVACY_OFFICE",
        ["intake.contact.erase"],
        [inbox("privacy_office")],
    ))
    user("privacy-office", "PRIVACY_OFFICE")

    # Each user's private inbox prefix (deploy/README.md): `_INBOX_<user>` with `-` as `_`,
    # except the resident apps', which is `_INBOX_resident`.
    user_inboxes = {name: name.replace("-", "_") for name, _ in user_roles}
    user_inboxes["resident-app"] = "resident"
    answer_callers(roles, user_roles, user_inboxes)

    text = (
        "# GENERATED by deploy/nats/gen_accounts.py: edit that, run it, commit both.\n"
        "#\n"
        "# Accounts and users of a wangge deployment. Included by single.conf and the cluster\n"
        "# node configs. WANGGE holds every stream; users get exactly their role's subjects.\n"
        "# Each user's inbox prefix is private (_INBOX_<user>): clients must connect with that\n"
        "# custom inbox prefix (wangge: nats.inbox_prefix), so no one can read another's replies.\n"
        "# SYS is the system account (monitoring with the nats CLI: `nats server report`).\n"
        "# `admin` (stream management, `wangge up`, backups) has every permission: keep its\n"
        "# password with the operators only.\n\n"
        "system_account: SYS\n\n"
        "accounts {\n"
        "  WANGGE {\n"
        "    jetstream: enabled\n\n"
        + "".join(render(role) for role in roles)
        + "\n    users: [\n"
        + '      { user: "admin", password: $WANGGE_NATS_PASS_ADMIN }\n'
        + "".join(users)
        + "    ]\n  }\n"
        "  SYS {\n"
        '    users: [ { user: "ops", password: $WANGGE_NATS_PASS_OPS } ]\n'
        "  }\n"
        "}\n"
    )
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(depts)} departments, {len(users) + 2} users)")


if __name__ == "__main__":
    main()
