-- activate.lua: a PENDING binding's path validated; it becomes the session's ACTIVE one.
--
-- reattach.lua grants a binding PENDING (pep, pbid, pnd, pk) and leaves the
-- current one (ep, bid, nd, k) in place: that one keeps forwarding, so a
-- request copied by an on-path attacker and answered at the attacker's address
-- cannot take a working session off the air. When the node holding the pending
-- binding sees the client's first authenticated packet from its address (or
-- the answer to a path challenge), it runs this script: the pending binding
-- replaces the current one, which ends here (its node learns it from the move
-- notice the caller publishes, and from its next refresh: NOT_OWNER). So the
-- store names at most one ACTIVE binding at any instant. The state and version
-- do not change: the reattach already consumed the version.
--
-- KEYS[1] - the session record, jvpn:{sid}
-- KEYS[2] - the session's nonce hash, jvpn:{sid}:n
-- KEYS[3] - its time index, jvpn:{sid}:nt
-- ARGV[1] - epoch of the caller's pending binding
-- ARGV[2] - its binding id (16 raw bytes)
-- ARGV[3] - node id of the caller
-- ARGV[4] - tombstone TTL, ms
-- ARGV[5] - the caller's store generation (optional; absent or 0: not checked)
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, version, state, epoch, node,
--          prev_epoch, prev_node, server_ms, expired_now, terminate_reason, activated_ms}
--   OK: the binding is ACTIVE now (or already was: the call is idempotent);
--   prev_epoch/prev_node the binding it ended and activated_ms when (a repeated call gets
--   them from the record's act field, so an activation whose answer was lost is still
--   recorded as it happened).
--   NOT_OWNER: a newer reattach superseded it (epoch/node: the current ones).
--   UNKNOWN_SESSION | TERMINATED | EXPIRED (expired_now = 1 when this call wrote
--   the tombstone) | GENERATION_MOVED.

local key, nkey, tkey = KEYS[1], KEYS[2], KEYS[3]
local epoch = tonumber(ARGV[1])
local bid = ARGV[2]
local node = ARGV[3]
local tomb_ms = tonumber(ARGV[4])
local want_gen = tonumber(ARGV[5]) or 0
local now = now_ms()

local f = redis.call('HMGET', key, 'st', 'v', 'ep', 'bid', 'nd', 'dl', 'tr', 'gen', 'cr', 'ma',
  'pep', 'pbid', 'pnd', 'pk', 'act')
if not f[1] then
  return reply({ST.UNKNOWN_SESSION, 0, -1, 0, '', 0, '', now, 0, 0, now})
end
if want_gen ~= 0 and num(f[8]) ~= want_gen then
  return reply({ST.GENERATION_MOVED, 0, -1, 0, '', 0, '', now, 0, 0, now})
end
local st, v, ep, nd = tonumber(f[1]), num(f[2]), num(f[3]), f[5] or ''

if st == S.TERMINATED then
  local tr = num(f[7])
  return reply({tombstone_status(tr), v, st, ep, nd, 0, '', now, 0, tr, now})
end
if now >= end_ms(num(f[6]), num(f[9]), num(f[10])) and next_state(st, EV.EXPIRE) == S.TERMINATED then
  local nv = write_tombstone(key, nkey, tkey, v, TR.EXPIRED, now, tomb_ms)
  return reply({ST.EXPIRED, nv, S.TERMINATED, ep, nd, 0, '', now, 1, TR.EXPIRED, now})
end
if ep == epoch and f[4] == bid and nd == node then  -- already active: a repeated call
  local aep, and_, at = 0, '', now
  if f[15] then aep, and_, at = cmsgpack.unpack(f[15]) end
  return reply({ST.OK, v, st, ep, nd, aep, and_, now, 0, 0, at})
end
if num(f[11]) ~= epoch or f[12] ~= bid or f[13] ~= node then
  return reply({ST.NOT_OWNER, v, st, ep, nd, 0, '', now, 0, 0, now})
end
redis.call('HSET', key, 'ep', epoch, 'bid', bid, 'nd', node, 'k', f[14],
  'act', cmsgpack.pack(ep, nd, now))
redis.call('HDEL', key, 'pep', 'pbid', 'pnd', 'pk')  -- pep = ep now: max(ep, pep) holds
return reply({ST.OK, v, st, epoch, node, ep, nd, now, 0, 0, now})
