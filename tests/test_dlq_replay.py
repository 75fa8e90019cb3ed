"""``hvobs dlq replay`` against a real redis-server: filters, dry runs, once per entry.

The dead-letter stream is written here as workers write it (one letter per entry a group gave
up on), including the same original entry dead-lettered by two groups and again later by a
third; the replays run the command's ``main`` (in this process, to keep the many runs quick; one
test runs the console script as a subprocess), and the event stream is read back raw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable

import anyio
import pytest

from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.state import MemoryStateStore
from hypervisor.observability.cli import main
from hypervisor.observability.workers import Worker, WorkerConfig
from hypervisor.observability.workers._derivations import RingMetricsDerivation
from hypervisor.observability.workers._dlq import (
    REASON_APPLY_ERROR,
    REASON_OVERSIZED,
    REASON_UNDECODABLE,
    DeadLetter,
    dlq_name,
    encode_dead_letter,
    list_dead_letters,
)
from redis_server import RedisServer

pytestmark = pytest.mark.redis

HVOBS = [sys.executable, "-m", "hypervisor.observability.cli"]


class Ran:
    """What a command printed (``main`` run in this process, as the console script runs it)."""

    def __init__(self, stdout: str, stderr: str) -> None:
        self.stdout = stdout
        self.stderr = stderr


@pytest.fixture
def hvobs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Ran]:
    """Run ``hvobs dlq ...`` on a stream in this process; it must succeed."""
    monkeypatch.delenv("HVOBS_REDIS_URL", raising=False)

    def run(url: str, stream: str, *args: str) -> Ran:
        capsys.readouterr()
        status = main(["dlq", *args, "--redis", url, "--stream", stream])
        out, err = capsys.readouterr()
        assert status == 0, err
        return Ran(out, err)

    return run


def run_subprocess(url: str, stream: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``hvobs dlq ...`` command; it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "HVOBS_REDIS_URL"}
    result = subprocess.run(
        [*HVOBS, "dlq", *args, "--redis", url, "--stream", stream],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def letter(original_id: str, group: str, reason: str, data: bytes) -> bytes:
    """A dead letter as a worker writes it."""
    return encode_dead_letter(
        DeadLetter(
            reason=reason,
            original_id=original_id,
            group=group,
            consumer=f"{group}-1",
            deliveries=1,
            error="e",
            data=data,
        )
    )


async def append(url: str, name: str, entries: list[bytes]) -> list[str]:
    async with RedisStreamLog(url, name) as log:
        return await log.append_many(entries)


async def stream_data(url: str, name: str) -> list[bytes]:
    async with RedisStreamLog(url, name) as log:
        return [entry.data or b"" for entry in await log.read("0-0", 10_000)]


def replayed_ids(result: Ran) -> list[str]:
    """The dead-letter ids a replay printed as replayed (``<dlq id> -> <new id>``)."""
    return [line.split()[0] for line in result.stdout.splitlines() if " -> " in line]


def test_replay_filters_dry_runs_and_replays_each_entry_once(
    redis_server: RedisServer, hvobs: Callable[..., Ran]
) -> None:
    """One original entry dead-lettered by two groups (and later by a third) is appended to
    the stream once, whatever the order of filtered and unfiltered replays; ``--dry-run``
    changes nothing; ``--group`` and ``--reason`` leave the other letters for later; an
    unreadable entry of the dead-letter stream is never replayed."""
    url, stream = redis_server.url, f"dlq:{uuid.uuid4().hex[:8]}"
    x, y, z = b"entry-x \x00\xff whole", b"entry-y", b"entry-z"
    dlq = dlq_name(stream)
    ids = anyio.run(
        append,
        url,
        dlq,
        [
            letter("100-0", "ring", REASON_UNDECODABLE, x),
            letter("101-0", "ring", REASON_OVERSIZED, y),
            b"\xc1 not a dead letter",
            letter("100-0", "spans", REASON_APPLY_ERROR, x),
            letter("102-0", "spans", REASON_UNDECODABLE, z),
        ],
    )

    dry = hvobs(url, stream, "replay", "--dry-run")
    assert replayed_ids(dry) == [ids[0], ids[1], ids[4]]
    assert "(dry run)" in dry.stdout
    assert f"{ids[3]} == entry 100-0" in dry.stdout  # the second group's letter of x
    assert "would replay 3 dead letters" in dry.stderr
    assert anyio.run(stream_data, url, stream) == []
    assert replayed_ids(hvobs(url, stream, "replay", "--dry-run")) == [ids[0], ids[1], ids[4]]

    # Only the spans group's undecodable letters: z (x's spans letter is an apply_error).
    first = hvobs(url, stream, "replay", "--group", "spans", "--reason", "undecodable")
    assert replayed_ids(first) == [ids[4]]
    assert "3 left by --group/--reason" in first.stderr
    assert anyio.run(stream_data, url, stream) == [z]

    # Only the spans group: x through its apply_error letter; its ring letter stays unsettled.
    second = hvobs(url, stream, "replay", "--group", "spans")
    assert replayed_ids(second) == [ids[3]]
    assert anyio.run(stream_data, url, stream) == [z, x]

    # Everything left: y; x's ring letter is a duplicate of the entry replayed already.
    third = hvobs(url, stream, "replay")
    assert replayed_ids(third) == [ids[1]]
    assert f"{ids[0]} == entry 100-0" in third.stdout
    assert "1 unreadable entries settled" in third.stderr
    assert anyio.run(stream_data, url, stream) == [z, x, y]

    # Nothing twice: not by a later run, not when a third group dead-letters x again.
    assert replayed_ids(hvobs(url, stream, "replay")) == []
    late = anyio.run(append, url, dlq, [letter("100-0", "late", REASON_UNDECODABLE, x)])
    fourth = hvobs(url, stream, "replay")
    assert replayed_ids(fourth) == []
    assert f"{late[0]} == entry 100-0" in fourth.stdout
    assert anyio.run(stream_data, url, stream) == [z, x, y]


def test_replay_limit_leaves_the_rest_for_the_next_run(
    redis_server: RedisServer, hvobs: Callable[..., Ran]
) -> None:
    """``--limit N`` replays the first N entries; the next run replays the others, each once."""
    url, stream = redis_server.url, f"dlq:{uuid.uuid4().hex[:8]}"
    datas = [f"entry-{n}".encode() for n in range(5)]
    anyio.run(
        append,
        url,
        dlq_name(stream),
        [letter(f"{n + 1}-0", "ring", REASON_UNDECODABLE, d) for n, d in enumerate(datas)],
    )
    first = hvobs(url, stream, "replay", "--limit", "2")
    assert len(replayed_ids(first)) == 2
    assert "3 left by --limit" in first.stderr
    assert len(replayed_ids(hvobs(url, stream, "replay"))) == 3
    assert anyio.run(stream_data, url, stream) == datas


async def _dead_letter_whole(url: str, stream: str, entries: list[bytes]) -> list[DeadLetter]:
    async with (
        RedisStreamLog(url, stream) as log,
        RedisStreamLog(url, dlq_name(stream)) as dlq,
    ):
        await log.append_many(entries)
        worker = Worker(
            log,
            [RingMetricsDerivation(MemoryStateStore())],
            WorkerConfig(group="ring", consumer="w1", max_event_bytes=64 * 1024),
            dlq=dlq,
        )
        async with worker, anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            seen, after = 0, "0-0"
            with anyio.fail_after(30):
                while seen < len(entries):  # a blocking read wakes at each letter
                    letters = await dlq.read(after, 10, block_s=1.0)
                    seen += len(letters)
                    after = letters[-1].id if letters else after
            worker.stop()
        return [item for _, item in await list_dead_letters(dlq)]


def test_a_dead_letter_keeps_the_original_entry_whole(redis_server: RedisServer) -> None:
    """A worker on a real Redis dead-letters an oversized entry (1 MiB, over its 64 KiB limit)
    and garbage with their bytes whole; ``hvobs dlq list`` prints them whole, and a replay
    appends exactly those bytes again."""
    url, stream = redis_server.url, f"dlq:{uuid.uuid4().hex[:8]}"
    big = bytes(range(256)) * 4096
    garbage = b"\x00garbage\xff"
    letters = anyio.run(_dead_letter_whole, url, stream, [big, garbage])
    assert sorted(item.data for item in letters) == sorted([big, garbage])
    listing = run_subprocess(url, stream, "list")
    printed = [bytes.fromhex(json.loads(line)["data"]) for line in listing.stdout.splitlines()]
    assert sorted(printed) == sorted([big, garbage])
    run_subprocess(url, stream, "replay")
    assert anyio.run(stream_data, url, stream)[2:] == [item.data for item in letters]
