-- rekey.lua: a REKEY's fresh Diffie-Hellman replaced the session secret.
--
-- The node that holds the session's ACTIVE binding ran the client's REKEY (a new
-- X25519 exchange inside the data channel) and derived the next secret
-- (session.keys.rekey_secret). This script installs it: the new wrapped secret
-- and wrapped control key, the next key generation, and a new binding (the
-- next unused epoch, a new binding id, same node and transport) whose traffic
-- keys derive from the new secret. The previous wrapped secret is kept (wsp)
-- only until the client proves it holds the new one: its first packet under
-- the new keys (confirm_key.lua), or a reattach proven under the new secret
-- (reattach.lua). If the client never got the answer (this node died first),
-- a reattach proven under the previous secret rolls the secret back
-- (reattach.lua, ARGV[13]). A PENDING grant is superseded (its epoch is never
-- reused). The state and version do not change.
--
-- KEYS[1] - the session record, jvpn:{sid}
-- KEYS[2] - the session's nonce hash, jvpn:{sid}:n
-- KEYS[3] - its time index, jvpn:{sid}:nt
-- ARGV[1] - epoch of the caller's ACTIVE binding
-- ARGV[2] - its binding id
-- ARGV[3] - node id of the caller
-- ARGV[4] - the key generation the client rekeys from
-- ARGV[5] - the new wrapped secret
-- ARGV[6] - the new wrapped control key
-- ARGV[7] - the new binding id (16 raw bytes)
-- ARGV[8] - tombstone TTL, ms
-- ARGV[9] - the caller's store generation (optional; absent or 0: not checked)
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, version, state, epoch, node,
--          generation, server_ms, expired_now, terminate_reason}
--   OK: epoch/generation are the new ones. NOT_OWNER: the caller does not hold the
--   ACTIVE binding (epoch/node: the current ones). STALE_VERSION: the key generation
--   moved on (generation: the current one). UNKNOWN_SESSION | TERMINATED | EXPIRED |
--   GENERATION_MOVED.

local key, nkey, tkey = KEYS[1], KEYS[2], KEYS[3]
local epoch, bid, node = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local from_gen = tonumber(ARGV[4])
local tomb_ms = tonumber(ARGV[8])
local want_gen = tonumber(ARGV[9]) or 0
local now = now_ms()

local f = redis.call('HMGET', key, 'st', 'v', 'ep', 'bid', 'nd', 'dl', 'tr', 'gen', 'cr', 'ma',
  'pep', 'kg', 'ws', 'kt', 'wc')
if not f[1] then
  return reply({ST.UNKNOWN_SESSION, 0, -1, 0, '', 0, now, 0, 0})
end
if want_gen ~= 0 and num(f[8]) ~= want_gen then
  return reply({ST.GENERATION_MOVED, 0, -1, 0, '', 0, now, 0, 0})
end
local st, v, ep, nd, kg = tonumber(f[1]), num(f[2]), num(f[3]), f[5] or '', num(f[12])
if st == S.TERMINATED then
  local tr = num(f[7])
  return reply({tombstone_status(tr), v, st, ep, nd, kg, now, 0, tr})
end
if now >= end_ms(num(f[6]), num(f[9]), num(f[10])) and next_state(st, EV.EXPIRE) == S.TERMINATED then
  local nv = write_tombstone(key, nkey, tkey, v, TR.EXPIRED, now, tomb_ms)
  return reply({ST.EXPIRED, nv, S.TERMINATED, ep, nd, kg, now, 1, TR.EXPIRED})
end
if ep ~= epoch or f[4] ~= bid or nd ~= node then
  return reply({ST.NOT_OWNER, v, st, ep, nd, kg, now, 0, 0})
end
if kg ~= from_gen then
  return reply({ST.STALE_VERSION, v, st, ep, nd, kg, now, 0, 0})
end
local nep = math.max(ep, num(f[11])) + 1
local kt = f[14] or f[9] or now
redis.call('HSET', key, 'wsp', f[13], 'ktp', kt, 'ws', ARGV[5], 'kg', kg + 1, 'kt', now,
  'ep', nep, 'bid', ARGV[7])
if f[15] then redis.call('HSET', key, 'wcp', f[15]) end
redis.call('HSET', key, 'wc', ARGV[6])
redis.call('HDEL', key, 'pep', 'pbid', 'pnd', 'pk')
return reply({ST.OK, v, st, nep, nd, kg + 1, now, 0, 0})
