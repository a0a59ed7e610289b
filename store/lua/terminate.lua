-- terminate.lua: explicit terminate (admin, client close, security, policy).
--
-- No version CAS: termination always wins. Idempotent: a tombstone is left as
-- it is (its first reason stays) and reported as TERMINATED/EXPIRED.
--
-- KEYS[1] - the session record, jvpn:{sid}
-- KEYS[2] - the session's nonce hash, jvpn:{sid}:n
-- KEYS[3] - its time index, jvpn:{sid}:nt
-- ARGV[1] - terminate reason (TerminateReason)
-- ARGV[2] - tombstone TTL, ms
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, version, prev_state, terminate_reason, epoch, node, server_ms}
--   status OK (tombstone written now) | TERMINATED | EXPIRED (already a tombstone,
--   nothing changed) | UNKNOWN_SESSION | ILLEGAL_TRANSITION.

local key, nkey, tkey = KEYS[1], KEYS[2], KEYS[3]
local reason = tonumber(ARGV[1])
local tomb_ms = tonumber(ARGV[2])
local now = now_ms()

local f = redis.call('HMGET', key, 'st', 'v', 'ep', 'nd', 'tr')
if not f[1] then
  return reply({ST.UNKNOWN_SESSION, 0, -1, 0, 0, '', now})
end
local st, v, ep, nd = tonumber(f[1]), num(f[2]), num(f[3]), f[4] or ''
if st == S.TERMINATED then
  local tr = num(f[5])
  return reply({tombstone_status(tr), v, st, tr, ep, nd, now})
end
if next_state(st, EV.TERMINATE) ~= S.TERMINATED then
  return reply({ST.ILLEGAL_TRANSITION, v, st, 0, ep, nd, now})
end
local nv = write_tombstone(key, nkey, tkey, v, reason, now, tomb_ms)
return reply({ST.OK, nv, st, reason, ep, nd, now})
