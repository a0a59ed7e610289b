-- read.lua: read one record together with the store's clock (no mutation).
--
-- KEYS[1] - the session record, jvpn:{sid}
--
-- Returns (msgpack-encoded, see reply() in common.lua) {server_ms, {field, value, ...}}; the list is empty when there is no record.

return reply({now_ms(), redis.call('HGETALL', KEYS[1])})
