-- Ends a lease held by holder; its sandbox leaves the pool.
-- ARGV: prefix, lease_id, holder.
-- Returns {sandbox_id, host_id, template}, or nil if the lease is not held.
local p, lid, holder = ARGV[1], ARGV[2], ARGV[3]
local lk = p .. 'lease:' .. lid
local v = redis.call('HMGET', lk, 'sb', 'host', 'tpl', 'holder')
if not v[1] or v[4] ~= holder then
  return false
end
redis.call('DEL', lk)
redis.call('ZREM', p .. 'lease_expiry', lid)
redis.call('DEL', p .. 'sb:' .. v[1])
local leasedk = p .. 'leased'
if redis.call('HINCRBY', leasedk, v[3], -1) <= 0 then
  redis.call('HDEL', leasedk, v[3])
end
return {v[1], v[2], v[3]}
