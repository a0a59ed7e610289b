-- transition.lua: a state transition, compare-and-set on state_version.
--
-- Applies one SessionEvent through the table. REATTACH and HANDSHAKE_COMPLETE
-- have their own scripts (they bind a transport) and are refused here.
-- TRANSPORT_LOST records `lost` = the version before it (see reattach.lua, the
-- transport-loss rule); any other applied event clears `lost`. TERMINATE and
-- EXPIRE write the tombstone (reason kept, GC expiry = tombstone TTL).
--
-- KEYS[1] - the session record, jvpn:{sid}
-- KEYS[2] - the session's nonce hash, jvpn:{sid}:n
-- KEYS[3] - its time index, jvpn:{sid}:nt
-- ARGV[1] - expected state_version
-- ARGV[2] - event (SessionEvent)
-- ARGV[3] - terminate reason (TerminateReason) for TERMINATE/EXPIRE; 0 = ADMIN/EXPIRED
-- ARGV[4] - tombstone TTL, ms
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, version, state, prev_state, expired_now, terminate_reason, epoch, server_ms}
--   status OK | UNKNOWN_SESSION | TERMINATED | EXPIRED | STALE_VERSION | ILLEGAL_TRANSITION.
--   EXPIRED with expired_now = 1: the deadline had passed, the tombstone was
--   written by this call (emit the event); the requested event was not applied.
--   On a refusal version/state are the current ones.

local key, nkey, tkey = KEYS[1], KEYS[2], KEYS[3]
local expected = tonumber(ARGV[1])
local event = tonumber(ARGV[2])
local reason = tonumber(ARGV[3])
local tomb_ms = tonumber(ARGV[4])
local now = now_ms()

local f = redis.call('HMGET', key, 'st', 'v', 'ep', 'dl', 'tr', 'cr', 'ma')
if not f[1] then
  return reply({ST.UNKNOWN_SESSION, 0, -1, -1, 0, 0, 0, now})
end
local st, v, ep = tonumber(f[1]), num(f[2]), num(f[3])

if st == S.TERMINATED then
  local tr = num(f[5])
  return reply({tombstone_status(tr), v, st, st, 0, tr, ep, now})
end
if now >= end_ms(num(f[4]), num(f[6]), num(f[7])) and next_state(st, EV.EXPIRE) == S.TERMINATED then
  local nv = write_tombstone(key, nkey, tkey, v, TR.EXPIRED, now, tomb_ms)
  return reply({ST.EXPIRED, nv, S.TERMINATED, st, 1, TR.EXPIRED, ep, now})
end
if event == EV.REATTACH or event == EV.HANDSHAKE_COMPLETE then
  return reply({ST.ILLEGAL_TRANSITION, v, st, st, 0, 0, ep, now})
end
if expected ~= v then
  return reply({ST.STALE_VERSION, v, st, st, 0, 0, ep, now})
end
local to = next_state(st, event)
if to == nil then
  return reply({ST.ILLEGAL_TRANSITION, v, st, st, 0, 0, ep, now})
end

if to == S.TERMINATED then
  if reason == 0 then
    reason = TR.ADMIN
    if event == EV.EXPIRE then reason = TR.EXPIRED end
  end
  local nv = write_tombstone(key, nkey, tkey, v, reason, now, tomb_ms)
  return reply({ST.OK, nv, to, st, 0, reason, ep, now})
end

local nv = v + 1
redis.call('HSET', key, 'st', to, 'v', nv)
if event == EV.TRANSPORT_LOST then
  redis.call('HSET', key, 'lost', v)
else
  redis.call('HDEL', key, 'lost')
end
return reply({ST.OK, nv, to, st, 0, 0, ep, now})
