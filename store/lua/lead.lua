-- lead.lua: hold (or give up) the routed egress lease: one node at a time answers for the
-- cluster's return address (docs/L3.md, Routed egress).
--
-- A holder renews its lease; anyone takes a free (expired) one. A holder that cannot reach
-- the store stops answering before its lease can pass to another node (the caller's
-- margin), so two nodes never answer at once for longer than that margin.
--
-- KEYS[1] - the lease, jvpn:{egress}:lead
-- ARGV[1] - the caller's node id
-- ARGV[2] - lease, ms; 0: give it up (if held)
--
-- Returns (msgpack-encoded, see reply() in common.lua) {holder, remaining ms}.

local key = KEYS[1]
local node, ttl = ARGV[1], tonumber(ARGV[2])
local holder = redis.call('GET', key)
if ttl == 0 then
  if holder == node then redis.call('DEL', key) end
  return reply({'', 0})
end
if holder == node or not holder then
  redis.call('SET', key, node, 'PX', ttl)
  return reply({node, ttl})
end
return reply({holder, redis.call('PTTL', key)})
