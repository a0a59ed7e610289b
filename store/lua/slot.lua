-- slot.lua: count a new session against its client's quota (ClientPolicy.max_sessions).
--
-- The client's live sessions are a sorted set, session id -> the latest the session can
-- live (created + max age: reattach and refresh cannot extend a session past it). Entries
-- past that are pruned here, so a session whose end was never reported stops counting at
-- its maximum age at the latest; gateways remove a session as it ends (ZREM).
--
-- KEYS[1] - the client's sessions, jvpn:{c<client id>}:s
-- ARGV[1] - session id (hex)
-- ARGV[2] - the quota (max live sessions)
-- ARGV[3] - the session's latest end, server ms
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, count}:
--   OK and the count with this session, or POLICY_DENIED and the count without it.

local key = KEYS[1]
local sid, limit, end_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local n = redis.call('ZCARD', key)
if not redis.call('ZSCORE', key, sid) and n >= limit then
  return reply({ST.POLICY_DENIED, n})
end
redis.call('ZADD', key, end_ms, sid)
local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
redis.call('PEXPIRE', key, math.max(1, last - now))
return reply({ST.OK, redis.call('ZCARD', key)})
