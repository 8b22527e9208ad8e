-- Extends a lease its holder still holds, if its host is alive.
-- ARGV: prefix, lease_id, holder, now_ms, expires_at_ms.
-- Returns {'ok', sandbox_id, host_id, template}, {'not_held'} or
-- {'host_dead', host_id}.
local p, lid, holder, now, exp = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local lk = p .. 'lease:' .. lid
local v = redis.call('HMGET', lk, 'sb', 'host', 'tpl', 'holder', 'exp')
if not v[1] or v[4] ~= holder or tonumber(v[5]) <= now then
  return {'not_held'}
end
local until_ms = redis.call('ZSCORE', p .. 'host_expiry', v[2])
if not until_ms or tonumber(until_ms) <= now then
  return {'host_dead', v[2]}
end
redis.call('HSET', lk, 'exp', exp)
redis.call('ZADD', p .. 'lease_expiry', exp, lid)
return {'ok', v[1], v[2], v[3]}
