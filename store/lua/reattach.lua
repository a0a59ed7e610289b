-- reattach.lua: the reattach compare-and-set (docs/ARCHITECTURE.md, Reattach step by step).
--
-- The caller has verified the client's proof (a MAC over session_id, expected
-- version, nonce, timestamp, kind). This script decides, atomically, in this
-- order, each check with its own status:
--   1. no record, or a record stamped with another store generation than the
--      caller's (a rolled-back or restored store, see store/README.md)
--                                         -> GENERATION_MOVED (reason UNKNOWN_SESSION;
--                                            the caller re-reads its generation)
--   2. tombstone                          -> EXPIRED if its reason is EXPIRED, else TERMINATED
--   3. deadline (or maximum age) passed   -> tombstone TERMINATED(EXPIRED) written here, EXPIRED,
--                                            expired_now = 1 (only this call reports it)
--   4. |timestamp - now| > window         -> CLOCK_SKEW
--   5. nonce already recorded             -> same addr tag: the recorded decision, unchanged,
--                                            retry = 1 (an idempotent retransmission);
--                                            other addr tag: REPLAYED_NONCE
--   6. nonce cache full                   -> RATE_LIMITED, not recorded (a flood, see below)
--      (min(4 * rr + 16, 1024) entries)
--   7. more than rr attempts in 60 s      -> RATE_LIMITED
--   8. transport kind not in the mask     -> POLICY_DENIED
--   9. expected version is not current    -> DUAL_ACTIVE_CONFLICT if it is the version the
--                                            last successful reattach consumed, less than the
--                                            dual-active window ago (two claimants raced);
--                                            else STALE_VERSION
--  10. table has no REATTACH from here    -> ILLEGAL_TRANSITION (reason POLICY_DENIED)
--  11. success: a PENDING binding (pep = max(ep, pep) + 1, pbid, pnd, pk), ATTACHED,
--      version+1, deadline = now + ttl, lv/lt recorded, GC expiry refreshed. The
--      current binding (ep, bid, nd, k) is unchanged until activate.lua.
--
-- The transport-loss rule: a gateway that observes a silent transport applies
-- TRANSPORT_LOST (transition.lua), which bumps the version and records the
-- version before it in `lost`. The client, which cannot know that, still
-- proves the version before the mark; so while the session is RECOVERING and
-- `lost` is set, expected == lost is accepted as current.
--
-- Every decision from step 7 on is recorded in KEYS[2] under the nonce as
-- cmsgpack(ts, status, reason, version, epoch, binding id, node, tag), where
-- ts is the server time of the decision and tag the first 16 hex digits of
-- sha1(addr tag) (msgpack rather than "a|b|c" because binding ids, node ids and
-- tags are arbitrary bytes), and indexed in KEYS[3] (sorted set: nonce scored
-- by ts). An entry older than now - 2 * window is stale: a request whose nonce
-- was decided at d carries a timestamp within window of d, so after
-- d + 2 * window it fails step 4 anyway; step 5 treats a stale entry it meets
-- as absent (and deletes it).
--
-- Every call's work is bounded, never the cache's size (constants NC, from
-- store.scripts.NonceCache): step 6 removes at most NC.PRUNE (32) stale entries,
-- the oldest first through the index (ZRANGEBYSCORE ... LIMIT), and checks the
-- size with HLEN; a call records at most one entry, so pruning keeps up. The
-- cache holds at most cap = min(4 * rr + 16, NC.MAX = 1024) entries whatever rr
-- says (4 * rr + 16 alone let a rate of 100k/min keep 400k entries): a call
-- that finds cap entries after pruning is refused without recording. As every
-- insertion happens below cap, HLEN >= cap after pruning means every entry is
-- live: the refusal is exact. Attempts are rate limited, so the hash holds about
-- min(rr, cap) entries; a client that floods past cap is refused without
-- recording, which only lets it replay its own refused requests while their
-- version is current. So at most 1024 decisions are recorded per 2 * window
-- (60 s by default): a configured rate above that is capped there.
--
-- The hash and its index always hold the same nonces (both written, pruned,
-- expired and deleted together). A hash without its index (written before the
-- index existed, or by an older gateway during a rolling upgrade: HLEN differs
-- from ZCARD) is indexed once from its recorded times, in one O(n) call.
--
-- KEYS[1] - the session record, jvpn:{sid}
-- KEYS[2] - the session's nonce hash, jvpn:{sid}:n
-- KEYS[3] - its time index, jvpn:{sid}:nt (sorted set: nonce -> decision ts)
-- ARGV[1] - expected state_version (from the proof)
-- ARGV[2] - nonce (16 raw bytes)
-- ARGV[3] - client timestamp, ms
-- ARGV[4] - transport kind (TransportKind)
-- ARGV[5] - new node id (the node that ran the proof)
-- ARGV[6] - new binding id (16 raw bytes, chosen by the caller)
-- ARGV[7] - addr tag: opaque id of the request's source address and transport
-- ARGV[8] - timestamp window, ms
-- ARGV[9] - dual-active window, ms
-- ARGV[10] - tombstone TTL, ms
-- ARGV[11] - GC slack, ms
-- ARGV[12] - the caller's store generation (optional; absent or 0: not checked)
-- ARGV[13] - the key generation of the secret the proof verified under (-1 or absent:
--            not checked). The current one (kg): the client holds it, so a previous
--            secret kept since a REKEY (wsp) goes on success. kg - 1 while wsp is kept:
--            the client never learned the REKEY (its node died first), and on success
--            the previous secret becomes the current one again (rekey.lua), but only
--            for a request stamped at or after the REKEY's commit (kt): one made
--            before it (withheld by an on-path attacker, or late) proves nothing about
--            the REKEY's answer. Any other: KEY_MOVED (the caller's cached secret is
--            stale, or the request predates the REKEY), recorded.
--
-- Returns (msgpack-encoded, see reply() in common.lua) {status, reason, version, epoch, binding_id, node, prev_node, server_ms,
--          state, retry, expired_now, binding_current, terminate_reason,
--          prev_state, prev_kind, binding_pending, decided_ms}
--   reason: RejectReason (0 on success). On success binding_id/node are the new
--   binding and prev_node/prev_kind the previous owner; on a rejection
--   version/epoch/node are the current ones and binding_id is empty. A retry
--   returns the recorded version/epoch/binding/node (prev_node empty: the retry
--   moved nothing) and binding_current says whether that binding still holds.
--   state/prev_state: after/before this call (-1: no record). binding_pending: the
--   returned binding is the session's PENDING one (always on success). decided_ms: the
--   store's TIME of the decision (a retry's: when it was first decided, so a write whose
--   answer was lost is still recorded at the time it was made).

local key, nkey, tkey = KEYS[1], KEYS[2], KEYS[3]
local expected = tonumber(ARGV[1])
local nonce = ARGV[2]
local client_ts = tonumber(ARGV[3])
local kind = tonumber(ARGV[4])
local new_node, new_bid = ARGV[5], ARGV[6]
local window = tonumber(ARGV[8])
local dual_window = tonumber(ARGV[9])
local tomb_ms = tonumber(ARGV[10])
local slack_ms = tonumber(ARGV[11])
local want_gen = tonumber(ARGV[12]) or 0
local proof_gen = tonumber(ARGV[13]) or -1
local now = now_ms()

local f = redis.call('HMGET', key, 'st', 'v', 'ep', 'bid', 'nd', 'k', 'dl', 'ttl', 'rr', 'tk',
  'rl', 'rn', 'lv', 'lt', 'lost', 'tr', 'gen', 'cr', 'ma', 'pep', 'pbid', 'kg', 'wsp', 'kt', 'lc')
if not f[1] then
  return reply({ST.UNKNOWN_SESSION, R.UNKNOWN_SESSION, 0, 0, '', '', '', now, -1, 0, 0, 0, 0, -1, 0, 0, now})
end
-- 1. (generation) a record of an older store generation does not exist any more
if want_gen ~= 0 and num(f[17]) ~= want_gen then
  return reply({ST.GENERATION_MOVED, R.UNKNOWN_SESSION, 0, 0, '', '', '', now, -1, 0, 0, 0, 0, -1, 0, 0, now})
end
local st, v, ep = tonumber(f[1]), num(f[2]), num(f[3])
local bid, nd, k = f[4] or '', f[5] or '', num(f[6])
local pep, pbid = num(f[20]), f[21] or ''

-- A rejection that reports the current record and changes nothing.
local function reject(status, reason, state, tr, expired_now)
  return reply({status, reason, v, ep, '', nd, '', now, state, 0, expired_now, 0, tr, st, k, 0, now})
end

-- 2. tombstone
if st == S.TERMINATED then
  local tr = num(f[16])
  local status = tombstone_status(tr)
  local reason = R.TERMINATED
  if status == ST.EXPIRED then reason = R.EXPIRED end
  return reject(status, reason, st, tr, 0)
end

-- 3. deadline, capped by the maximum age (authoritative; key expiry only collects garbage)
if now >= end_ms(num(f[7]), num(f[18]), num(f[19])) then
  if next_state(st, EV.EXPIRE) ~= S.TERMINATED then
    return reject(ST.ILLEGAL_TRANSITION, R.POLICY_DENIED, st, 0, 0)
  end
  v = write_tombstone(key, nkey, tkey, v, TR.EXPIRED, now, tomb_ms)
  return reject(ST.EXPIRED, R.EXPIRED, S.TERMINATED, TR.EXPIRED, 1)
end

-- 4. timestamp window
if math.abs(client_ts - now) > window then
  return reject(ST.CLOCK_SKEW, R.CLOCK_SKEW, st, 0, 0)
end

-- 5. nonce: an idempotent retry, or a replay
local tag = string.sub(redis.sha1hex(ARGV[7]), 1, 16)
local horizon = now - 2 * window
local seen = redis.call('HGET', nkey, nonce)
if seen and cmsgpack.unpack(seen) < horizon then
  redis.call('HDEL', nkey, nonce)  -- stale (not pruned yet): as if it were gone
  redis.call('ZREM', tkey, nonce)
  seen = nil
end
if seen then
  local dts, dstatus, dreason, dv, dep, dbid, dnd, dtag = cmsgpack.unpack(seen)
  if dtag ~= tag then
    return reject(ST.REPLAYED_NONCE, R.REPLAYED_NONCE, st, 0, 0)
  end
  local current, pending = 0, 0
  if dstatus == ST.OK and dep == ep and dbid == bid then current = 1 end
  if dstatus == ST.OK and dep == pep and dbid == pbid then current, pending = 1, 1 end
  -- A write, so that durable mode's WAIT after this call covers the recorded decision.
  local keep = math.max(redis.call('PTTL', nkey), 1000)
  redis.call('PEXPIRE', nkey, keep)
  if redis.call('EXISTS', tkey) == 1 then redis.call('PEXPIRE', tkey, keep) end
  return reply({dstatus, dreason, dv, dep, dbid, dnd, '', now, st, 1, 0, current, 0, st, k, pending, dts})
end

-- 6. prune the nonce cache (bounded); refuse a flood without recording it
local n = redis.call('HLEN', nkey)
local indexed = redis.call('EXISTS', tkey) == 1
-- A small cache has no index (it would cost more memory than the cache): pruning reads
-- it whole, at most NC.INDEX_AT entries. A larger one gets its index, built once from the
-- recorded times (also a hash an older gateway wrote, or one whose index is out of step).
local function build_index()
  redis.call('DEL', tkey)
  local entries = redis.call('HGETALL', nkey)
  for i = 1, #entries, 2 do
    redis.call('ZADD', tkey, cmsgpack.unpack(entries[i + 1]), entries[i])
  end
  local pttl = redis.call('PTTL', nkey)
  if pttl > 0 then redis.call('PEXPIRE', tkey, pttl) end
  indexed = true
end
if (indexed and n ~= redis.call('ZCARD', tkey)) or (not indexed and n > NC.INDEX_AT) then
  build_index()
end
local stale = {}
if indexed then
  stale = redis.call('ZRANGEBYSCORE', tkey, '-inf', horizon - 1, 'LIMIT', 0, NC.PRUNE)
elseif n > 0 then
  local entries = redis.call('HGETALL', nkey)
  for i = 1, #entries, 2 do
    if cmsgpack.unpack(entries[i + 1]) < horizon then stale[#stale + 1] = entries[i] end
  end
end
if #stale > 0 then
  redis.call('HDEL', nkey, unpack(stale))
  if indexed then redis.call('ZREM', tkey, unpack(stale)) end
  n = redis.call('HLEN', nkey)
end
local rr = num(f[9])
if n >= math.min(NC.PER_RATE * rr + NC.SLACK, NC.MAX) then
  return reject(ST.RATE_LIMITED, R.RATE_LIMITED, st, 0, 0)
end

local gc_ms = num(f[7]) - now + slack_ms

-- Record this nonce's decision (from here on every decision is recorded).
local function decide(status, reason, dv, dep, dbid, dnd)
  redis.call('HSET', nkey, nonce, cmsgpack.pack(now, status, reason, dv, dep, dbid, dnd, tag))
  redis.call('PEXPIRE', nkey, gc_ms)
  if indexed then
    redis.call('ZADD', tkey, now, nonce)
    redis.call('PEXPIRE', tkey, gc_ms)
  elseif n + 1 > NC.INDEX_AT then
    build_index()
  end
end

local function refuse(status, reason)
  decide(status, reason, v, ep, '', '')
  return reject(status, reason, st, 0, 0)
end

-- 7. rate limit: rr attempts per fixed 60 s window
local rl, rn = num(f[11]), num(f[12])
if now - rl >= 60000 then rl, rn = now, 0 end
if rn >= rr then
  return refuse(ST.RATE_LIMITED, R.RATE_LIMITED)
end
rn = rn + 1
redis.call('HSET', key, 'rl', rl, 'rn', rn)

-- 8. transport policy
if bit.band(num(f[10]), 2 ^ kind) == 0 then
  return refuse(ST.POLICY_DENIED, R.POLICY_DENIED)
end

-- 9. version CAS (with the transport-loss rule)
local lost = tonumber(f[15])
if expected ~= v and not (st == S.RECOVERING and lost ~= nil and expected == lost) then
  local lv, lt = tonumber(f[13]), num(f[14])
  if lv ~= nil and expected == lv and now - lt < dual_window then
    -- The nonce's first 8 bytes are the client's claim id, the same for every request it
    -- makes for one version: a request of the claim that consumed it is the same client's
    -- superseded attempt (its earlier one won), just stale; another claim is a conflict.
    if f[25] and string.sub(nonce, 1, 8) == f[25] then
      return refuse(ST.STALE_VERSION, R.STALE_VERSION)
    end
    return refuse(ST.DUAL_ACTIVE_CONFLICT, R.DUAL_ACTIVE_CONFLICT)
  end
  return refuse(ST.STALE_VERSION, R.STALE_VERSION)
end

-- 10. the table
local to = next_state(st, EV.REATTACH)
if to == nil then
  return refuse(ST.ILLEGAL_TRANSITION, R.POLICY_DENIED)
end

-- (the secret) a proof under the previous secret is good only while the store still has it
local kg, rollback = num(f[22]), false
if proof_gen >= 0 and proof_gen ~= kg then
  -- A request made before the REKEY was committed (kt) cannot say the client missed its
  -- answer: an attacker who withheld it would put back the secret the client dropped.
  if proof_gen ~= kg - 1 or not f[23] or client_ts < num(f[24]) then
    return refuse(ST.KEY_MOVED, R.STORE_UNAVAILABLE)
  end
  rollback = true
end

-- 11. grant the new binding, PENDING: the previous binding stays the session's (ep, bid,
-- nd, k) and keeps forwarding until activate.lua, run when the new path has validated,
-- makes this one ACTIVE. Epochs are never granted twice: a newer grant supersedes an
-- unvalidated one with the next epoch.
local nv, nep = v + 1, math.max(ep, pep) + 1
local ttl = num(f[8])
redis.call('HSET', key, 'st', to, 'v', nv, 'pep', nep, 'pbid', new_bid, 'pnd', new_node,
  'pk', kind, 'dl', now + ttl, 'lv', expected, 'lt', now, 'lc', string.sub(nonce, 1, 8))
redis.call('HDEL', key, 'lost')
if rollback then
  local p = redis.call('HMGET', key, 'wsp', 'ktp', 'wcp')
  redis.call('HSET', key, 'ws', p[1], 'kt', p[2] or now, 'kg', proof_gen)
  if p[3] then redis.call('HSET', key, 'wc', p[3]) end
end
if proof_gen >= 0 then redis.call('HDEL', key, 'wsp', 'ktp', 'wcp') end
redis.call('PEXPIRE', key, ttl + slack_ms)
gc_ms = ttl + slack_ms
decide(ST.OK, 0, nv, nep, new_bid, new_node)
return reply({ST.OK, 0, nv, nep, new_bid, new_node, nd, now, to, 0, 0, 1, 0, st, k, 1, now})
