-- refresh.lua: keepalive TTL refresh and ownership check by the binding owner.
--
-- Only the holder of the current binding (epoch and node), or of the PENDING
-- one a reattach granted (reattach.lua) while its path validates, may push the
-- deadline; anyone else gets NOT_OWNER with the current epoch/node and must
-- drop its binding (fencing: a paused or partitioned node learns here that it
-- lost the session). The refresh changes no state, so it does NOT bump
-- state_version (the client's proofs stay valid across keepalives). It never
-- renews a session past its maximum age: at created + max age the session ends
-- (EXPIRED) like any expiry (end_ms in common.lua).
--
-- KEYS[1] - the session record, jvpn:{sid}
-- KEYS[2] - the session's nonce hash, jvpn:{sid}:n
-- KEYS[3] - its time index, jvpn:{sid}:nt
-- ARGV[1] - epoch of the caller's binding
-- ARGV[2] - node id of the caller
-- ARGV[3] - tombstone TTL, ms
-- ARGV[4] - GC slack, ms
-- ARGV[5] - the caller's store generation (optional; absent or 0: not checked)
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, version, state, epoch, node, deadline_ms, server_ms, expired_now,
--          terminate_reason}
--   status OK (deadline pushed) | NOT_OWNER | UNKNOWN_SESSION | TERMINATED |
--   EXPIRED (expired_now = 1 when this call wrote the tombstone).
--   A record stamped with another store generation than the caller's is
--   GENERATION_MOVED (the caller re-reads its generation).

local key, nkey, tkey = KEYS[1], KEYS[2], KEYS[3]
local epoch = tonumber(ARGV[1])
local node = ARGV[2]
local tomb_ms = tonumber(ARGV[3])
local slack_ms = tonumber(ARGV[4])
local want_gen = tonumber(ARGV[5]) or 0
local now = now_ms()

local f = redis.call('HMGET', key, 'st', 'v', 'ep', 'nd', 'dl', 'ttl', 'tr', 'gen', 'cr', 'ma',
  'pep', 'pnd')
if not f[1] then
  return reply({ST.UNKNOWN_SESSION, 0, -1, 0, '', 0, now, 0, 0})
end
if want_gen ~= 0 and num(f[8]) ~= want_gen then
  return reply({ST.GENERATION_MOVED, 0, -1, 0, '', 0, now, 0, 0})
end
local st, v, ep, nd, dl = tonumber(f[1]), num(f[2]), num(f[3]), f[4] or '', num(f[5])
local cr, ma = num(f[9]), num(f[10])

if st == S.TERMINATED then
  local tr = num(f[7])
  return reply({tombstone_status(tr), v, st, ep, nd, dl, now, 0, tr})
end
if now >= end_ms(dl, cr, ma) and next_state(st, EV.EXPIRE) == S.TERMINATED then
  local nv = write_tombstone(key, nkey, tkey, v, TR.EXPIRED, now, tomb_ms)
  return reply({ST.EXPIRED, nv, S.TERMINATED, ep, nd, dl, now, 1, TR.EXPIRED})
end
if (ep ~= epoch or nd ~= node) and (num(f[11]) ~= epoch or f[12] ~= node) then
  return reply({ST.NOT_OWNER, v, st, ep, nd, dl, now, 0, 0})
end

local ttl = num(f[6])
dl = now + ttl
redis.call('HSET', key, 'dl', dl)
redis.call('PEXPIRE', key, ttl + slack_ms)
return reply({ST.OK, v, st, ep, nd, end_ms(dl, cr, ma), now, 0, 0})
