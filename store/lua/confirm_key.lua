-- confirm_key.lua: the client holds the session secret of key generation ARGV[1].
--
-- Run by the holder of the ACTIVE binding at the client's first packet under the
-- keys a REKEY made (rekey.lua): the previous wrapped secret (and its wrapped
-- control key) go, so a dump of the store no longer holds anything that derives
-- the traffic keys used before the rekey. Idempotent; a generation that is not
-- the current one changes nothing.
--
-- KEYS[1] - the session record, jvpn:{sid}
-- ARGV[1] - the key generation the client proved
--
-- Returns (msgpack-encoded, see reply() in common.lua) {forgotten}: 1 if a previous
-- secret was forgotten now, else 0.

local f = redis.call('HMGET', KEYS[1], 'kg', 'wsp')
if not f[2] or num(f[1]) ~= tonumber(ARGV[1]) then
  return reply({0})
end
redis.call('HDEL', KEYS[1], 'wsp', 'ktp', 'wcp')
return reply({1})
