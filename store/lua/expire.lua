-- expire.lua: one sweeper step for one session.
--
-- The expiry index (jvpn:expiry) is only a hint: this script, run per
-- candidate, is what decides. Past its deadline (capped by its maximum age,
-- end_ms in common.lua) and not terminated: write the
-- tombstone TERMINATED(EXPIRED) and report it (expired_now = 1, the caller
-- emits the event). Otherwise report the current deadline so the caller can
-- reschedule the hint (the earlier of the TTL and max-age deadlines).
--
-- KEYS[1] - the session record, jvpn:{sid}
-- KEYS[2] - the session's nonce hash, jvpn:{sid}:n
-- KEYS[3] - its time index, jvpn:{sid}:nt
-- ARGV[1] - tombstone TTL, ms
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, expired_now, version, deadline_ms, epoch, node, prev_state, server_ms,
--          client_id}
--   status EXPIRED (expired_now = 1 if by this call) | OK (live; deadline_ms = when to
--   look again) | TERMINATED | UNKNOWN_SESSION | ILLEGAL_TRANSITION.

local key, nkey, tkey = KEYS[1], KEYS[2], KEYS[3]
local tomb_ms = tonumber(ARGV[1])
local now = now_ms()

local f = redis.call('HMGET', key, 'st', 'v', 'ep', 'nd', 'dl', 'tr', 'cid', 'cr', 'ma')
if not f[1] then
  return reply({ST.UNKNOWN_SESSION, 0, 0, 0, 0, '', -1, now, ''})
end
local st, v, ep, nd, dl = tonumber(f[1]), num(f[2]), num(f[3]), f[4] or '', num(f[5])
local cid = f[7] or ''
if st == S.TERMINATED then
  return reply({tombstone_status(num(f[6])), 0, v, dl, ep, nd, st, now, cid})
end
dl = end_ms(dl, num(f[8]), num(f[9]))
if now < dl then
  return reply({ST.OK, 0, v, dl, ep, nd, st, now, cid})
end
if next_state(st, EV.EXPIRE) ~= S.TERMINATED then
  return reply({ST.ILLEGAL_TRANSITION, 0, v, dl, ep, nd, st, now, cid})
end
local nv = write_tombstone(key, nkey, tkey, v, TR.EXPIRED, now, tomb_ms)
return reply({ST.EXPIRED, 1, nv, dl, ep, nd, st, now, cid})
