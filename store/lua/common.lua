-- common.lua: helpers shared by every script.
--
-- At registration the store prepends, in this order: the transition table
-- TRANSITIONS (session.states.lua_transition_table()), the constant tables
-- S (SessionState), EV (SessionEvent), R (RejectReason), TR (TerminateReason),
-- ST (StoreStatus), all generated from the Python enums; then this file; then
-- the operation's script. Nothing here reads a wall clock: "now" is Redis TIME,
-- one clock for every gateway (Redis 7 replicates script effects, so TIME is
-- safe before writes).
--
-- Record fields (hash jvpn:{sid}): st state, v state_version, ep epoch,
-- bid binding id (16 raw bytes), nd node id, k transport kind, ws wrapped
-- session secret (tombstones keep it for now), cid client id (hex),
-- up upstream, ttl ms, dl deadline ms,
-- rr reattach rate per minute, tk allowed transports bitmask (1 << kind),
-- rl/rn rate window start ms and count, lv/lt version consumed by the last
-- reattach and when, lost version before a gateway-observed TRANSPORT_LOST,
-- cr created ms, ma maximum age ms (absent on records born before maximum
-- ages: no limit), gen store generation, tr/te terminate reason and time,
-- ia/ap an L3 session's inner addresses and allowed destination prefixes.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(x)
  return tonumber(x) or 0
end

-- The table's next state, or nil when (state, event) is illegal.
local function next_state(state, event)
  local row = TRANSITIONS[state]
  if row == nil then return nil end
  return row[event]
end

-- When a live session ends unless renewed: its deadline dl, capped at its
-- maximum age (cr + ma), which nothing renews. Every expiry check (reattach,
-- refresh, transition, expire) compares now with this, never with dl alone, and
-- the sweeper's index is scheduled by it; a session at its maximum age ends as
-- an expiry (TERMINATED, reason EXPIRED).
local function end_ms(dl, cr, ma)
  if ma > 0 and cr + ma < dl then return cr + ma end
  return dl
end

-- What a tombstone answers: EXPIRED if it expired, else TERMINATED.
local function tombstone_status(tr)
  if tr == TR.EXPIRED then return ST.EXPIRED end
  return ST.TERMINATED
end

-- Turn a live record into its tombstone: TERMINATED with ``reason``, version+1,
-- GC expiry ``tomb_ms``. The ONLY place a tombstone is written (terminate,
-- expire, and the expiry paths of reattach, refresh and transition all call it).
-- Keeps st, tr, v, ep, nd, te, dl, cr, gen (a late request gets an explicit
-- TERMINATED/EXPIRED) and wc, the wrapped control key a gateway MACs that answer
-- with; the wrapped secrets (ws, wsp) go (store/README.md, Tombstones). The nonce
-- keys go. Returns the new version.
local function write_tombstone(key, nkey, tkey, v, reason, now, tomb_ms)
  local nv = v + 1
  redis.call('HSET', key, 'st', S.TERMINATED, 'v', nv, 'tr', reason, 'te', now)
  -- No secret outlives the session: the wrapped secrets go, the wrapped control key (wc,
  -- which derives nothing) stays to authenticate a late TERMINATED (store/README.md).
  redis.call('HDEL', key, 'lost', 'lv', 'lt', 'lc', 'rl', 'rn', 'pbid', 'pnd', 'pk', 'ws', 'wsp',
    'ktp', 'wcp', 'act')
  redis.call('PEXPIRE', key, tomb_ms)
  redis.call('DEL', nkey, tkey)
  return nv
end

-- Every script returns its flat array msgpack-encoded, as ONE bulk reply: the
-- pure-Python RESP parser costs several microseconds per array element, a
-- msgpack decode of the whole reply costs about one.
local function reply(t)
  return cmsgpack.pack(t)
end
