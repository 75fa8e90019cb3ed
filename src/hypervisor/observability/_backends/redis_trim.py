"""Retention of a Redis stream: the trim script and when ``RedisStreamLog`` runs it.

Retention never removes entries a consumer group still needs. On Redis 8.2 and later the server
does that itself (``XTRIM ... ACKED``); on older servers the script computes the safe point
(the lowest of every group's oldest pending id and the successor of its last-delivered id)
and never trims past it, atomically.

It keeps up with any append rate: ``RedisStreamLog`` runs it after every ``max_len / 4``
entries it appended (and at least every ``trim_interval_s``, or ``max_age_s / 2`` when that is
shorter, for the age bound), and one run trims everything over the bound: ``~`` with ``LIMIT 0``
(the server's default limit with ``~`` is 100 stream nodes, about 10k entries, per call), which
removes whole stream nodes only, so at most one node (``stream-node-max-entries``, 100) more
than the bound stays. Trimming by length walks only the entries it is about to remove (those
over ``max_len``, about ``max_len / 4`` plus a batch): when all of them lie below the safe point
it trims with ``MAXLEN``, else with ``MINID`` up to the last one that does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hypervisor.observability._backends.log import TrimPolicy

__all__ = ["TRIM_SCRIPT", "TrimSchedule", "trim_args"]

# KEYS[1] = stream; ARGV = max_len (-1 = none), max_age_ms (-1 = none), approximate ("1"/"0"),
# acked mode ("1" = let the server protect unacknowledged entries, 8.2+). Returns the number of
# entries removed.
TRIM_SCRIPT = """
local key = KEYS[1]
local max_len = tonumber(ARGV[1])
local max_age_ms = tonumber(ARGV[2])
local approx = ARGV[3] == '1'
local acked = ARGV[4] == '1'
if redis.call('EXISTS', key) == 0 then return 0 end
local function parse(id)
  local d = string.find(id, '-', 1, true)
  return {tonumber(string.sub(id, 1, d - 1)), tonumber(string.sub(id, d + 1))}
end
local function less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local function fmt(id) return string.format('%.0f-%.0f', id[1], id[2]) end
local function xtrim(strategy, threshold)
  local args = {'XTRIM', key, strategy}
  if approx then table.insert(args, '~') else table.insert(args, '=') end
  table.insert(args, threshold)
  -- LIMIT 0: no cap on one call's work (with '~' the default cap is 100 nodes).
  if approx then table.insert(args, 'LIMIT'); table.insert(args, '0') end
  if acked then table.insert(args, 'ACKED') end
  return redis.call(unpack(args))
end
-- The safe point: nothing at or after it may go.
local safe = nil
if not acked then
  local groups = redis.call('XINFO', 'GROUPS', key)
  for _, g in ipairs(groups) do
    local name, ldi, pending
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1]
      elseif g[i] == 'last-delivered-id' then ldi = g[i + 1]
      elseif g[i] == 'pending' then pending = g[i + 1] end
    end
    local l = parse(ldi)
    local s = {l[1], l[2] + 1}
    if pending > 0 then
      local p = parse(redis.call('XPENDING', key, name)[2])
      if less(p, s) then s = p end
    end
    if safe == nil or less(s, safe) then safe = s end
  end
end
local removed = 0
if max_age_ms >= 0 then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local cut = {now_ms - max_age_ms, 0}
  if safe ~= nil and less(safe, cut) then cut = safe end
  removed = removed + xtrim('MINID', fmt(cut))
end
local over = max_len >= 0 and redis.call('XLEN', key) - max_len or 0
if over > 0 then
  if safe == nil then
    removed = removed + xtrim('MAXLEN', max_len)
  else
    -- The oldest entries below the safe point, as many as are over the bound (at most 100k a
    -- call, so a first trim of a huge stream never holds the server for long): when all of
    -- them are, MAXLEN is safe; else trim up to the last one found.
    local below = redis.call('XRANGE', key, '-', '(' .. fmt(safe), 'COUNT', math.min(over, 100000))
    if #below == over then
      removed = removed + xtrim('MAXLEN', max_len)
    elseif #below > 0 then
      local last = parse(below[#below][1])
      removed = removed + xtrim('MINID', fmt({last[1], last[2] + 1}))
    end
  end
end
return removed
"""


def trim_args(policy: TrimPolicy, *, acked: bool) -> list[Any]:
    """The script's ``ARGV`` for ``policy`` (``acked``: the server protects groups itself)."""
    return [
        -1 if policy.max_len is None else policy.max_len,
        -1 if policy.max_age_s is None else int(policy.max_age_s * 1000),
        b"1" if policy.approximate else b"0",
        b"1" if acked else b"0",
    ]


class TrimSchedule:
    """When the automatic trim runs: after ``max_len / 4`` appended entries, or when
    ``interval_s`` (at most ``max_age_s / 2``) has passed since the last one.

    The count keeps the stream within about ``max_len * 1.25`` plus one append batch at any
    rate; the time keeps an age bound within about ``1.5 * max_age_s``.

    Args:
        policy: the retention.
        interval_s: the longest time between two trims (capped at ``max_age_s / 2``).
        clock: monotonic seconds (tests pass their own).
    """

    __slots__ = ("_clock", "_due", "_every", "_interval_s", "_since")

    def __init__(
        self,
        policy: TrimPolicy,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._every = max(1, policy.max_len // 4) if policy.max_len is not None else None
        if policy.max_age_s is not None:
            interval_s = min(interval_s, policy.max_age_s / 2)
        self._interval_s = interval_s
        self._since = 0
        self._due = 0.0

    def appended(self, count: int) -> bool:
        """Record ``count`` appended entries; return whether a trim is due now (and reset)."""
        self._since += count
        now = self._clock()
        if (self._every is not None and self._since >= self._every) or now >= self._due:
            self._since = 0
            self._due = now + self._interval_s
            return True
        return False
