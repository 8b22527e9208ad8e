-- Leases an owner's parked sandbox if its host is alive. A parked sandbox of
-- a dead host stays parked (the host may only be late; evict reports it).
-- ARGV: prefix, owner, sandbox_id, holder, now_ms, expires_at_ms, lease_id.
-- Returns {host_id, template}, or nil.
local p, owner, id, holder, now, exp, lid =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
local pk = p .. 'parked:' .. owner
if redis.call('SISMEMBER', pk, id) == 0 then
  return false
end
local sbk = p .. 'sb:' .. id
local v = redis.call('HMGET', sbk, 'host', 'tpl')
if not v[1] then
  return false
end
local until_ms = redis.call('ZSCORE', p .. 'host_expiry', v[1])
if not until_ms or tonumber(until_ms) <= now then
  return false
end
redis.call('SREM', pk, id)
redis.call('SREM', p .. 'host_parked:' .. v[1], id)
redis.call('HSET', sbk, 'state', 'leased')
redis.call('HDEL', sbk, 'owner')
redis.call('HSET', p .. 'lease:' .. lid, 'sb', id, 'host', v[1], 'tpl', v[2], 'holder', holder, 'exp', exp)
redis.call('ZADD', p .. 'lease_expiry', exp, lid)
redis.call('HINCRBY', p .. 'leased', v[2], 1)
return {v[1], v[2]}
