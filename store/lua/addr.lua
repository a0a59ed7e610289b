-- addr.lua: allocate a session's inner addresses (one pool index) from the cluster's pools.
--
-- The pools are one slot ({pool}): a freed index is reused before an unused one is taken,
-- so the work is O(1) whatever the pool's size. Idempotent per session: a session that
-- holds an index gets it again (a retried claim after an unknown outcome). The caller's
-- pool spec must be the one the store allocates from (set by the first claim): nodes
-- configured with other prefixes would hand out addresses that collide.
--
-- KEYS[1] - the pools, jvpn:{pool} (hash: spec, next)
-- KEYS[2] - freed indexes, jvpn:{pool}:f (set)
-- KEYS[3] - owners, jvpn:{pool}:o (hash: index -> session id hex)
-- KEYS[4] - by session, jvpn:{pool}:s (hash: session id hex -> "index:claimed ms")
-- ARGV[1] - session id (hex)
-- ARGV[2] - the pool spec (InnerPool.spec)
-- ARGV[3] - the pool's size (indexes 0 .. size-1)
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, index, used}:
--   OK and the index | POOL_EXHAUSTED (-1) | POOL_MISMATCH (-1); used: indexes held.

local pool, free, owners, bysid = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sid, spec, size = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()

local f = redis.call('HMGET', pool, 'spec', 'next')
if f[1] and f[1] ~= spec then
  return reply({ST.POOL_MISMATCH, -1, redis.call('HLEN', owners)})
end
local held = redis.call('HGET', bysid, sid)
if held then
  return reply({ST.OK, tonumber(string.match(held, '^(%d+)')), redis.call('HLEN', owners)})
end
local idx = redis.call('SPOP', free)
if idx then
  idx = tonumber(idx)
else
  local nxt = num(f[2])
  if nxt >= size then
    return reply({ST.POOL_EXHAUSTED, -1, redis.call('HLEN', owners)})
  end
  idx = nxt
  redis.call('HSET', pool, 'next', nxt + 1)
end
if not f[1] then redis.call('HSET', pool, 'spec', spec) end
redis.call('HSET', owners, idx, sid)
redis.call('HSET', bysid, sid, string.format('%d:%d', idx, now))
return reply({ST.OK, idx, redis.call('HLEN', owners)})
