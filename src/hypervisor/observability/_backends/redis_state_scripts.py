"""The Lua scripts of ``RedisStateStore`` (``redis_state``): each one atomic step on the keys of
one derivation, all of them sharing its hash tag so they stay in one slot on a cluster.

Every key these scripts read may hold anything a writer with the worker's keys put there; what
is not a value a worker wrote is replaced where a worker can recover (the lease, the wake-up
list) and otherwise returned raw for the store to check.
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE",
    "COMMIT",
    "FETCH",
    "LEASE_ROUND",
    "NOTIFY",
    "RELEASE",
    "REPLAY",
    "RESTORE",
    "STAGE",
]

# Take or extend the lease. A lease key that no worker wrote (another type, or a string without
# expiry: every lease has one) would block every applier for good; it is replaced, and what it
# was is returned so the caller can report it. KEYS: lease. ARGV: token, ttl ms.
# Returns {1 if held now else 0, what was replaced or ''}.
LEASE = """
local function take(key, token, ttl)
  local repaired = ''
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= 'string' then
    repaired = 'a ' .. kind
  elseif kind == 'string' and redis.call('PTTL', key) == -1 then
    repaired = 'a string without expiry'
  end
  if repaired ~= '' then redis.call('DEL', key) end
  local held = redis.call('GET', key)
  if not held then
    redis.call('SET', key, token, 'PX', ttl)
    return 1, repaired
  end
  if held == token then
    redis.call('PEXPIRE', key, ttl)
    return 1, repaired
  end
  return 0, repaired
end
"""
ACQUIRE = (
    LEASE
    + """
local got, repaired = take(KEYS[1], ARGV[1], ARGV[2])
return {got, repaired}
"""
)

# The lease, and the committed version, epoch and applied id (raw: the caller checks them).
# KEYS: lease, meta. ARGV: token, ttl ms. Returns {held, version or false, what was replaced or
# '', epoch, applied, applied key}.
LEASE_ROUND = (
    LEASE
    + """
local got, repaired = take(KEYS[1], ARGV[1], ARGV[2])
if got == 0 then return {0, false, repaired, '', '', ''} end
local meta = redis.call('HMGET', KEYS[2], 'version', 'epoch', 'applied', 'applied_key')
return {1, meta[1] or '0', repaired, meta[2] or '', meta[3] or '', meta[4] or ''}
"""
)

# One pending wake-up at most; a wake-up key of another type is replaced (returned as its type).
# KEYS: wake list.
NOTIFY = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local repaired = ''
if kind ~= 'none' and kind ~= 'list' then
  redis.call('DEL', KEYS[1])
  repaired = 'a ' .. kind
end
redis.call('LPUSH', KEYS[1], '1')
redis.call('LTRIM', KEYS[1], 0, 0)
return repaired
"""

RELEASE = """
if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: idx, batches, open. ARGV: member, records.
STAGE = """
redis.call('ZADD', KEYS[1], 0, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# Open batches whose first id is below ARGV[2] and whose last id is above both ARGV[1] and the
# applied id (sort keys), at most ARGV[3] scanned, with their records; the first member beyond
# the scan, if any; the applied key and id (checked by the caller). KEYS: open, batches, meta.
FETCH = """
local n = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local used = 0
local low = ARGV[1]
local ak = redis.call('HGET', KEYS[3], 'applied_key') or ''
if ak > low then low = ak end
local ms = redis.call('ZRANGEBYLEX', KEYS[1], '-', '(' .. ARGV[2], 'LIMIT', 0, n + 1)
local out = {}
local more = false
for i, m in ipairs(ms) do
  if i > n or used >= budget then more = m break end
  if string.sub(m, 43, 83) > low then
    local records = redis.call('HGET', KEYS[2], m) or ''
    out[#out + 1] = m
    out[#out + 1] = records
    used = used + string.len(records)
  end
end
return {more, out, ak, redis.call('HGET', KEYS[3], 'applied') or ''}
"""

# The redo records in (after, upto] and the skipped ids among them, unless a checkpoint beyond
# `after` dropped some, or the state's epoch is not ARGV[4] (when ARGV[3] is '1'): then nil.
# KEYS: meta, idx, batches, skip. ARGV: after key, upto key, check epoch ('1'/'0'), epoch.
REPLAY = """
if ARGV[3] == '1' and (redis.call('HGET', KEYS[1], 'epoch') or '') ~= ARGV[4] then
  return false
end
local rk = redis.call('HGET', KEYS[1], 'retained_key')
if not rk or (rk ~= '' and string.len(rk) ~= 41) then
  -- Written before records were retained (or not by a worker): the checkpoint is the bound.
  rk = redis.call('HGET', KEYS[1], 'checkpoint_key') or ''
end
if rk > ARGV[1] then return false end
local ms = redis.call('ZRANGEBYLEX', KEYS[2], '-', '(' .. ARGV[2] .. '}')
local out = {}
for _, m in ipairs(ms) do
  if string.sub(m, 43, 83) > ARGV[1] then
    out[#out + 1] = m
    out[#out + 1] = redis.call('HGET', KEYS[3], m) or ''
  end
end
return {out, redis.call('ZRANGEBYLEX', KEYS[4], '(' .. ARGV[1], '[' .. ARGV[2])}
"""

# Meta, checkpoint, redo records in (checkpoint, applied] and skipped ids, atomically.
# KEYS: meta, snap, idx, batches, skip.
RESTORE = """
local meta = redis.call('HGETALL', KEYS[1])
local snap = redis.call('GET', KEYS[2])
local ak, ck = '', ''
for i = 1, #meta, 2 do
  if meta[i] == 'applied_key' then ak = meta[i + 1] end
  if meta[i] == 'checkpoint_key' then ck = meta[i + 1] end
end
local out = {}
local skips = {}
if ak > ck then
  local ms = redis.call('ZRANGEBYLEX', KEYS[3], '-', '(' .. ak .. '}')
  for _, m in ipairs(ms) do
    if string.sub(m, 43, 83) > ck then
      out[#out + 1] = m
      out[#out + 1] = redis.call('HGET', KEYS[4], m) or ''
    end
  end
  local low = '-'
  if ck ~= '' then low = '(' .. ck end
  skips = redis.call('ZRANGEBYLEX', KEYS[5], low, '[' .. ak)
end
return {meta, snap, out, skips}
"""

# The version- and epoch-checked commit. KEYS: meta, seen (current gen), seen (gen to drop), skip,
# snap, idx, batches, open. ARGV: expected version, version, applied, applied key, seen gen, seen
# count, seen ids (packed, '' for none), drop ('1'/'0'), snapshot ('' for none; a snapshot is
# never empty), expected epoch ('' for none), epoch, skipped sort keys...
COMMIT = """
local current = redis.call('HMGET', KEYS[1], 'version', 'epoch')
if tonumber(current[1] or '0') ~= tonumber(ARGV[1]) then return 0 end
if (current[2] or '') ~= ARGV[10] then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'applied', ARGV[3], 'applied_key', ARGV[4],
  'seen_gen', ARGV[5], 'seen_count', ARGV[6])
if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'epoch', ARGV[11])
else redis.call('HDEL', KEYS[1], 'epoch') end
if ARGV[7] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[7]) end
if ARGV[8] == '1' then redis.call('DEL', KEYS[3]) end
for i = 12, #ARGV do redis.call('ZADD', KEYS[4], 0, ARGV[i]) end
local key = ARGV[4]
for _, m in ipairs(redis.call('ZRANGEBYLEX', KEYS[8], '-', '(' .. key .. '}')) do
  if string.sub(m, 43, 83) <= key then redis.call('ZREM', KEYS[8], m) end
end
if ARGV[9] ~= '' then
  -- The records up to the previous checkpoint go; those since it stay one more interval, so
  -- a view that is behind replays them instead of loading the snapshot (retained_key).
  local prev = redis.call('HGET', KEYS[1], 'checkpoint_key') or ''
  redis.call('SET', KEYS[5], ARGV[9])
  redis.call('HSET', KEYS[1], 'checkpoint', ARGV[3], 'checkpoint_key', key, 'retained_key', prev)
  if prev ~= '' then
    local ms = redis.call('ZRANGEBYLEX', KEYS[6], '-', '(' .. prev .. '}')
    for _, m in ipairs(ms) do
      if string.sub(m, 43, 83) <= prev then
        redis.call('ZREM', KEYS[6], m)
        redis.call('HDEL', KEYS[7], m)
      end
    end
    redis.call('ZREMRANGEBYLEX', KEYS[4], '-', '[' .. prev)
  end
end
return 1
"""
