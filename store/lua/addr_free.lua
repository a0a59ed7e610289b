-- addr_free.lua: a session ended; its inner addresses go back to the pool.
--
-- Idempotent: a session holding nothing frees nothing. Only the index's current owner
-- frees it (an index reused by another session since stays with that session).
--
-- KEYS[1] - freed indexes, jvpn:{pool}:f (set)
-- KEYS[2] - owners, jvpn:{pool}:o (hash: index -> session id hex)
-- KEYS[3] - by session, jvpn:{pool}:s (hash: session id hex -> "index:claimed ms")
-- ARGV[1] - session id (hex)
--
-- Returns (msgpack-encoded, see reply() in common.lua) {freed}: 1 if freed now, else 0.

local free, owners, bysid = KEYS[1], KEYS[2], KEYS[3]
local sid = ARGV[1]
local held = redis.call('HGET', bysid, sid)
if not held then
  return reply({0})
end
local idx = string.match(held, '^(%d+)')
redis.call('HDEL', bysid, sid)
if redis.call('HGET', owners, idx) == sid then
  redis.call('HDEL', owners, idx)
  redis.call('SADD', free, idx)
end
return reply({1})
