-- Removes up to max leases that lapsed (expires_at_ms <= now_ms), soonest
-- first; their sandboxes leave the pool.
-- ARGV: prefix, now_ms, max.
-- Returns a flat array: lease_id, sandbox_id, host_id, template, holder,
-- expires_at_ms for each lease removed.
local p, now, max = ARGV[1], ARGV[2], ARGV[3]
local ek = p .. 'lease_expiry'
local leasedk = p .. 'leased'
local lids = redis.call('ZRANGEBYSCORE', ek, '-inf', now, 'LIMIT', 0, max)
local out = {}
for _, lid in ipairs(lids) do
  local lk = p .. 'lease:' .. lid
  local v = redis.call('HMGET', lk, 'sb', 'host', 'tpl', 'holder', 'exp')
  redis.call('ZREM', ek, lid)
  if v[1] then
    redis.call('DEL', lk)
    redis.call('DEL', p .. 'sb:' .. v[1])
    if redis.call('HINCRBY', leasedk, v[3], -1) <= 0 then
      redis.call('HDEL', leasedk, v[3])
    end
    for _, x in ipairs({lid, v[1], v[2], v[3], v[4], v[5]}) do
      out[#out + 1] = x
    end
  end
end
return out
