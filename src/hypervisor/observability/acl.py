"""Least-privilege Redis users for one bus stream: the rules behind ``hvobs acl``.

Four roles, each confined to the keys of one stream (the stream, its dead-letter stream and the
workers' state of the named consumer groups) and to the commands this package runs on them:

* ``producer``: append to the stream (``XADD``) and nothing else;
* ``reader``: read the stream and its dead letters (a ``RedisEventBus`` that tails and queries,
  ``hvobs dlq list``); read-only keys, no scripts;
* ``worker``: what ``hvobs worker ring-metrics|saga-spans`` runs: the consumer-group commands on
  the stream, dead-lettering to the dead-letter stream, and the state scripts and reads on the
  groups' state keys;
* ``admin``: every stream command and the state commands on those keys, plus deleting and
  resetting state (``--reset-state``), ``hvobs dlq replay`` and retention trimming.

The key patterns come from the functions that name the keys (``dlq_name``, ``state_prefix``), so
they cannot drift from what the workers use. For a partitioned stream (``partitions`` > 1) the
patterns cover every partition's keys (``{S:p*}``, its dead letters ``{S:p*}:dlq``, the state
``hvobs:worker:{S:p*}:<group>:*``: the names of ``PartitionLayout``), and every role may also
read and create the layout record (``GET``/``SET`` on ``hvobs:layout:{S}``) and run what
finding the partitions' nodes takes: ``INFO`` (cluster detection), ``CLUSTER SLOTS`` (the slot
map), ``COMMAND`` (redis-py's cluster client, for the layout record) and ``ASKING``. Names
are glob-escaped, so a stream called ``a*`` grants ``a*`` and not ``ab``. The rules are Redis
7.0 syntax (``%R~``/``%W~`` key permissions, selectors in parentheses, ``command|subcommand``)
and start with ``reset``, so running a line again replaces the user's permissions instead of
adding to them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from hypervisor.observability._backends.state import state_prefix
from hypervisor.observability._core.partition import MAX_PARTITIONS, registry_key
from hypervisor.observability.errors import AclArgumentError
from hypervisor.observability.workers._dlq import dlq_name

__all__ = [
    "FORMATS",
    "ROLES",
    "Grant",
    "acl_line",
    "acl_rules",
    "password_rule",
    "role_grants",
    "roles_granting",
]

ROLES: Final = ("producer", "reader", "worker", "admin")
"""The roles ``hvobs acl`` knows, least privileged first."""
FORMATS: Final = ("setuser", "aclfile")
"""Output forms: ``ACL SETUSER <user> ...`` commands, or ``user <user> ...`` ACL file lines."""

# What each part of the package runs, as Redis 7.0 names the commands. Keep these in step with
# the code: the tests run every component under its role against a real server.
_READ_STREAM: Final = ("xread", "xrange", "xrevrange", "xlen", "xinfo|stream")
"""RedisEventBus's tailing reader, its start and index_lag(); ``hvobs dlq list``."""
_APPEND: Final = ("xadd",)
"""RedisEventBus's writer."""
_CONSUME: Final = (
    "xreadgroup",
    "xack",
    "xautoclaim",
    "xpending",
    "xinfo|groups",
    "xinfo|stream",
    "xgroup|create",
)
"""The worker runtime and applier on the stream (read, ack, claim, watermark, group creation,
the gap check's counters)."""
_DEAD_LETTER: Final = ("xadd", "xread")
"""The worker on the dead-letter stream: dead-lettering and ``hvobs dlq list``."""
_STATE: Final = (
    "evalsha",
    "get",
    "set",
    "pexpire",
    "pttl",
    "hget",
    "hset",
    "hgetall",
    "hmget",
    "hdel",
    "zadd",
    "zrem",
    "zrange",
    "zrangebylex",
    "zremrangebylex",
    "lpush",
    "rpush",
    "ltrim",
    "lrange",
    "blpop",
    "del",
    "type",
)
"""``RedisStateStore``: its scripts (by digest) and every command they and the store run."""
_KEYLESS_WORKER: Final = ("script|load", "multi", "exec")
"""Loading the state scripts (after a server restart) and the store's read transactions."""
_ADMIN_EXTRA: Final = ("@stream", "unlink", "exists", "type", "scan", "time")
"""Every stream command (trim, delete entries, destroy groups, replay), deleting keys, the
``SCAN`` of ``--reset-state`` and the ``TIME`` of the retention script."""

_PARTITIONED: Final = ("info", "cluster|slots", "command", "asking")
"""What a partitioned bus runs besides its keys' commands: cluster detection (``INFO``), the
slot map (``CLUSTER SLOTS``), and redis-py's cluster client for the layout record (``COMMAND``
at its start, ``ASKING`` after an ``ASK`` redirection)."""
_LAYOUT: Final = ("get", "set")
"""The layout record: read it, create it with ``SET NX``."""
_REGISTRY: Final = ("evalsha", "time", "zadd", "zremrangebyscore", "pexpire", "zrange", "zrem")
"""A partitioned worker's heartbeat in its group's registry (one script: the server's clock,
stamp, drop the silent, list the live) and its leaving (``ZREM``)."""

_GLOB: Final = re.compile(r"([*?\[\]\\])")
# Characters that cannot be written in one unquoted token of a redis-cli line or an ACL file
# (both split on whitespace and treat quotes specially), or that would end a selector early.
_UNSAFE: Final = re.compile(r"[\s\"'()\x00-\x1f\x7f]")
_USER: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_MAX_NAME: Final = 1024


@dataclass(frozen=True, slots=True)
class Grant:
    """Commands a user may run on some keys: the root permissions or one selector.

    Attributes:
        keys: key rules (``~pattern`` read-write, ``%R~pattern`` read-only, ``%W~pattern``
            write-only).
        commands: command names or ``@categories``, lower case, without the ``+``.
    """

    keys: tuple[str, ...]
    commands: tuple[str, ...]

    def rules(self) -> list[str]:
        """Return the grant as ACL rule tokens."""
        return [*self.keys, *(f"+{command}" for command in self.commands)]


def _check_name(kind: str, value: str) -> str:
    if not value:
        raise AclArgumentError(f"the {kind} name is empty")
    if len(value) > _MAX_NAME:
        raise AclArgumentError(f"the {kind} name is longer than {_MAX_NAME} characters")
    bad = _UNSAFE.search(value)
    if bad is not None:
        raise AclArgumentError(
            f"the {kind} name {value!r} contains {bad.group()!r}: whitespace, control "
            "characters, quotes and parentheses cannot be written in an ACL rule"
        )
    return value


def _glob_escape(value: str) -> str:
    """Escape Redis glob metacharacters, so the pattern matches ``value`` literally."""
    return _GLOB.sub(r"\\\1", value)


def role_grants(
    role: str, stream: str, groups: Sequence[str] = (), *, partitions: int = 1
) -> list[Grant]:
    """Return the root grant and the selectors of ``role`` on ``stream``.

    Args:
        role: one of :data:`ROLES`.
        stream: the bus stream key (the stream's name when partitioned).
        groups: the consumer groups whose worker state the role may use (worker and admin
            roles: at least one; the other roles take none).
        partitions: the stream's partition count; above 1 the grants cover every partition's
            keys and the layout record, on a single Redis or a cluster.

    Raises:
        AclArgumentError: an unknown role, an unusable name, a partition count out of range,
            or groups missing or misplaced.
    """
    if role not in ROLES:
        raise AclArgumentError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    _check_name("stream", stream)
    for group in groups:
        _check_name("group", group)
    if len(set(groups)) != len(groups):
        raise AclArgumentError("a --group is given twice")
    needs_groups = role in ("worker", "admin")
    if needs_groups and not groups:
        raise AclArgumentError(
            f"the {role} role needs --group (each consumer group whose state it may use)"
        )
    if groups and not needs_groups:
        raise AclArgumentError(f"--group applies to the worker and admin roles, not to {role}")
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise AclArgumentError(f"partitions must be a number, not {partitions!r}")
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise AclArgumentError(f"partitions must be 1 .. {MAX_PARTITIONS}, not {partitions}")
    if partitions > 1:
        if "{" in stream or "}" in stream:
            raise AclArgumentError(f"a partitioned stream name {stream!r} cannot contain braces")
        return _partitioned_grants(role, stream, groups)
    stream_key = _glob_escape(stream)
    dlq_key = _glob_escape(dlq_name(stream))
    # Every key of a group's state starts with state_prefix(stream, group, derivation) + ":";
    # an empty derivation leaves the prefix up to the derivation name, which "*" then covers.
    state_keys = tuple(
        f"~{state_prefix(_glob_escape(stream), _glob_escape(group), '')}*" for group in groups
    )
    if role == "producer":
        return [Grant((f"%W~{stream_key}",), _APPEND)]
    if role == "reader":
        return [Grant((f"%R~{stream_key}", f"%R~{dlq_key}"), _READ_STREAM)]
    if role == "worker":
        return [
            Grant((f"~{stream_key}",), (*_CONSUME, *_KEYLESS_WORKER)),
            Grant(state_keys, _STATE),
            Grant((f"~{dlq_key}",), _DEAD_LETTER),
        ]
    return [
        Grant(
            (f"~{stream_key}", f"~{dlq_key}", *state_keys),
            (*_ADMIN_EXTRA, *_STATE, *_KEYLESS_WORKER),
        )
    ]


def _partitioned_grants(role: str, stream: str, groups: Sequence[str]) -> list[Grant]:
    """``role_grants`` of a partitioned stream: the keys of every partition (``PartitionLayout``'s
    names, ``{S:p<i>}`` or ``{S:p<i>.<k>}``, matched by ``{S:p*}``) and the layout record."""
    name = _glob_escape(stream)
    stream_key = f"{{{name}:p*}}"
    dlq_key = dlq_name(stream_key)
    state_keys = tuple(f"~hvobs:worker:{stream_key}:{_glob_escape(g)}:*" for g in groups)
    registries = tuple(f"~{registry_key(name, _glob_escape(g))}" for g in groups)
    layout = Grant((f"~hvobs:layout:{{{name}}}",), _LAYOUT)
    if role == "producer":
        return [Grant((f"%W~{stream_key}",), (*_APPEND, *_PARTITIONED)), layout]
    if role == "reader":
        keys = (f"%R~{stream_key}", f"%R~{dlq_key}")
        return [Grant(keys, (*_READ_STREAM, *_PARTITIONED)), layout]
    if role == "worker":
        return [
            Grant((f"~{stream_key}",), (*_CONSUME, *_KEYLESS_WORKER, *_PARTITIONED)),
            Grant(state_keys, _STATE),
            Grant((f"~{dlq_key}",), _DEAD_LETTER),
            layout,
            *([Grant(registries, _REGISTRY)] if registries else []),
        ]
    return [
        Grant(
            (f"~{stream_key}", f"~{dlq_key}", *state_keys, *registries, *layout.keys),
            (*_ADMIN_EXTRA, *_STATE, *_KEYLESS_WORKER, *_PARTITIONED),
        )
    ]


def acl_rules(
    role: str, stream: str, groups: Sequence[str] = (), *, partitions: int = 1
) -> list[str]:
    """Return the ACL rules of ``role`` on ``stream``, without user and password.

    The first rules reset the user (``reset``, no channels, no commands); selectors are single
    tokens in parentheses.

    Raises:
        AclArgumentError: see :func:`role_grants`.
    """
    root, *selectors = role_grants(role, stream, groups, partitions=partitions)
    rules = ["resetchannels", "-@all", *root.rules()]
    rules.extend("(" + " ".join(selector.rules()) + ")" for selector in selectors)
    return rules


def password_rule(password: str, *, plaintext: bool = False) -> str:
    """Return the password rule: ``#<sha256 hex>`` (default) or ``><password>``.

    The hashed form keeps the password out of files and terminals; Redis checks it the same way.

    Raises:
        AclArgumentError: the password is empty, or cannot be written as plain text.
    """
    if not password:
        raise AclArgumentError("the password is empty")
    if not plaintext:
        return "#" + hashlib.sha256(password.encode()).hexdigest()
    if _UNSAFE.search(password):
        # Never echo the password itself in the error.
        raise AclArgumentError(
            "the password contains whitespace, quotes, parentheses or control characters, "
            "which cannot be written as plain text in an ACL rule: use the hashed form"
        )
    return ">" + password


def acl_line(
    role: str,
    stream: str,
    user: str,
    password: str,
    *,
    groups: Sequence[str] = (),
    form: str = "setuser",
    plaintext: bool = False,
    partitions: int = 1,
) -> str:
    """Return one line that creates or replaces ``user`` with ``role`` on ``stream``.

    Args:
        role: one of :data:`ROLES`.
        stream: the bus stream key.
        user: the Redis user name.
        password: its password (hashed into the line unless ``plaintext``).
        groups: consumer groups (worker and admin roles).
        form: ``"setuser"`` for ``ACL SETUSER ...`` (redis-cli), ``"aclfile"`` for a
            ``user ...`` line of an ACL file (``aclfile`` in redis.conf).
        plaintext: write ``>password`` instead of ``#<sha256>``.
        partitions: the stream's partition count (see :func:`role_grants`).

    Raises:
        AclArgumentError: an unusable argument; the message never contains the password.
    """
    if form not in FORMATS:
        raise AclArgumentError(f"unknown format {form!r}: choose one of {', '.join(FORMATS)}")
    if not _USER.fullmatch(user):
        raise AclArgumentError(
            f"the user name {user!r} is not usable: 1-128 characters, letters, digits and "
            "_ . : @ - (starting with a letter or digit)"
        )
    rules = acl_rules(role, stream, groups, partitions=partitions)
    head = "ACL SETUSER" if form == "setuser" else "user"
    return " ".join(
        [head, user, "reset", "on", password_rule(password, plaintext=plaintext), *rules]
    )


def roles_granting(command: str) -> tuple[str, ...]:
    """Return the roles whose rules allow ``command`` (lower case; ``name|sub`` or ``name``)
    on some key, least privileged first (used to explain a refused command)."""
    command = command.lower()
    base = command.split("|", 1)[0]
    found: list[str] = []
    for role in ROLES:
        groups = ("g",) if role in ("worker", "admin") else ()
        commands = {c for grant in role_grants(role, "s", groups) for c in grant.commands}
        if (
            command in commands
            or base in commands
            or ("@stream" in commands and base.startswith("x"))
        ):
            found.append(role)
    return tuple(found)
