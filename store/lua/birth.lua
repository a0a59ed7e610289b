-- birth.lua: create a session after a completed handshake.
--
-- The record is created at BIRTH with state_version 0 (creation is not a
-- transition, as session.states.StateMachine starts at version 0), then
-- HANDSHAKE_COMPLETE is applied through the table: ATTACHED, version 1, epoch 1.
-- Fails with EXISTS if the key exists (live or tombstone).
--
-- KEYS[1] - the session record, jvpn:{sid}
-- KEYS[2] - the session's nonce hash, jvpn:{sid}:n (cleared)
-- KEYS[3] - its time index, jvpn:{sid}:nt (cleared)
-- ARGV[1] - binding id (16 raw bytes)
-- ARGV[2] - node id of the binding owner
-- ARGV[3] - transport kind (TransportKind)
-- ARGV[4] - wrapped session secret (opaque bytes)
-- ARGV[5] - client id (hex of the client's static public key)
-- ARGV[6] - upstream "host:port"
-- ARGV[7] - ttl, ms
-- ARGV[8] - reattach rate limit, per minute
-- ARGV[9] - allowed transports bitmask (bit 1 << kind)
-- ARGV[10] - store generation
-- ARGV[11] - GC slack, ms (key expiry = ttl + slack; safety never relies on it)
-- ARGV[12] - maximum age, ms (optional; absent or 0: none): the session ends at
--            created + max age whatever renews it (common.lua, end_ms)
-- ARGV[13] - wrapped control key (optional): what a tombstone keeps, so a late request
--            still gets an authenticated answer once the secret is gone
-- ARGV[14] - inner addresses (optional; L3 sessions): "v4/len,v6/len", claimed before by
--            addr.lua, never changed while the session lives
-- ARGV[15] - allowed destination prefixes (optional; L3 sessions), comma-separated
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, version, epoch, state, server_ms, deadline_ms}
--   deadline_ms: when the session ends unless renewed (end_ms: ttl capped by max age)
--   status OK | EXISTS | POLICY_DENIED (kind not in the mask) | ILLEGAL_TRANSITION

local key, nkey, tkey = KEYS[1], KEYS[2], KEYS[3]
local kind = tonumber(ARGV[3])
local ttl = tonumber(ARGV[7])
local mask = tonumber(ARGV[9])
local ma = tonumber(ARGV[12]) or 0
local now = now_ms()

if redis.call('EXISTS', key) == 1 then
  return reply({ST.EXISTS, 0, 0, -1, now, 0})
end
if bit.band(mask, 2 ^ kind) == 0 then
  return reply({ST.POLICY_DENIED, 0, 0, -1, now, 0})
end
local state = next_state(S.BIRTH, EV.HANDSHAKE_COMPLETE)
if state == nil then
  return reply({ST.ILLEGAL_TRANSITION, 0, 0, S.BIRTH, now, 0})
end

local version, epoch, deadline = 1, 1, now + ttl
redis.call('DEL', nkey, tkey)
redis.call('HSET', key,
  'st', state, 'v', version, 'ep', epoch, 'bid', ARGV[1], 'nd', ARGV[2], 'k', kind,
  'ws', ARGV[4], 'cid', ARGV[5], 'up', ARGV[6], 'ttl', ttl, 'dl', deadline,
  'rr', tonumber(ARGV[8]), 'tk', mask, 'cr', now, 'gen', tonumber(ARGV[10]))
if ma > 0 then redis.call('HSET', key, 'ma', ma) end
if ARGV[13] and ARGV[13] ~= '' then redis.call('HSET', key, 'wc', ARGV[13]) end
if ARGV[14] and ARGV[14] ~= '' then
  redis.call('HSET', key, 'ia', ARGV[14], 'ap', ARGV[15] or '')
end
redis.call('PEXPIRE', key, ttl + tonumber(ARGV[11]))
return reply({ST.OK, version, epoch, state, now, end_ms(deadline, now, ma)})
