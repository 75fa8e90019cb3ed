"""``BusUnavailableError`` says what is known of its events' fate and carries them, so an
application can re-emit them safely (readers and workers drop copies)."""

from __future__ import annotations

from collections import Counter

import pytest

from hypervisor.observability._backends import RedisStreamLog
from hypervisor.observability._core.codec import decode_events
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.errors import BusUnavailableError
from hypervisor.observability.redis_bus import RedisEventBus
from redis_proxy import ReplyDroppingProxy
from redis_server import RedisServer, free_port

pytestmark = pytest.mark.anyio


async def _stored_ids(url: str, stream: str) -> Counter[str]:
    """How many times each event id is in the stream, read with a fresh client."""
    ids: Counter[str] = Counter()
    async with RedisStreamLog(url, stream) as log:
        after = "0-0"
        while entries := await log.read(after, 5000):
            decoded, _ = decode_events([e.data or b"" for e in entries])
            ids.update(e.event_id for e in decoded)
            after = entries[-1].id
    return ids


def _events(count: int, tag: str) -> list[HypervisorEvent]:
    return [
        HypervisorEvent(event_type=EventType.VFS_WRITE, session_id=tag, payload={"i": i})
        for i in range(count)
    ]


@pytest.mark.redis
async def test_lost_replies_give_an_error_of_unknown_fate_and_re_emitting_counts_once(
    redis_server: RedisServer, stream_name: str
) -> None:
    """Every append reply is lost (Redis applies the appends, the bus never learns it): past
    the retry deadline ``emit_many`` of 160 events raises ``BusUnavailableError`` whose message
    says the fate is unknown and that re-emitting is safe, with ``stored_unknown`` set and the
    160 events in ``events``, although the stream holds some of them. Re-emitting
    ``error.events`` once Redis answers again leaves each event exactly once in the index, of
    this bus and of a new reader."""
    events = _events(160, "lost-replies")
    async with ReplyDroppingProxy(redis_server.port, drop_all=True) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with RedisEventBus.from_url(
            url,
            stream_name,
            max_events=None,
            batch_size=40,
            retry_deadline_s=0.3,
            retry_base_s=0.01,
            retry_cap_s=0.05,
        ) as bus:
            proxy.armed = True
            with pytest.raises(BusUnavailableError) as caught:
                await bus.emit_many(events)
            error = caught.value
            assert error.stored_unknown is True
            assert error.events == tuple(events)
            message = str(error)
            assert "160 of the 160 events were not confirmed stored" in message
            assert "fate is unknown" in message
            assert "Re-emitting them (error.events) is safe" in message
            assert proxy.dropped >= 4  # each of the 4 batches lost its replies
            stored = await _stored_ids(redis_server.url, stream_name)
            assert stored.keys() & {e.event_id for e in events}  # stored after all

            proxy.drop_all = proxy.armed = False
            await bus.emit_many(error.events)
            await bus.sync()
            assert await bus.all_events() == events
            assert bus.duplicates > 0
    stored = await _stored_ids(redis_server.url, stream_name)
    assert stored.keys() == {e.event_id for e in events}
    assert max(stored.values()) > 1  # the stream holds copies; the indexes below do not
    async with RedisEventBus.from_url(redis_server.url, stream_name, max_events=None) as reader:
        assert await reader.all_events() == events


async def test_refused_connections_give_an_error_saying_nothing_was_stored(
    stream_name: str,
) -> None:
    """Nothing listens on the port (connections refused: no request is sent): ``emit`` raises
    ``BusUnavailableError`` with ``stored_unknown`` false, a message saying the event was not
    stored, and the event in ``events``; buffered events lost the same way come back from
    ``flush()`` in its error's ``events``."""
    async with RedisEventBus.from_url(
        f"redis://127.0.0.1:{free_port()}/0",
        stream_name,
        reader=False,  # a producer's start sends nothing
        retry_deadline_s=0.3,
        retry_base_s=0.01,
        retry_cap_s=0.05,
    ) as bus:
        event = HypervisorEvent(session_id="refused")
        with pytest.raises(BusUnavailableError) as caught:
            await bus.emit(event)
        assert caught.value.stored_unknown is False
        assert caught.value.events == (event,)
        assert "were not stored (no request reached redis)" in str(caught.value)

        buffered = _events(3, "buffered")
        for one in buffered:
            bus.emit_nowait(one)
        with pytest.raises(BusUnavailableError) as caught:
            await bus.flush()
        assert caught.value.stored_unknown is False
        assert caught.value.events == tuple(buffered)
        assert "3 buffered events were not confirmed stored" in str(caught.value)
        assert bus.failed == 4
