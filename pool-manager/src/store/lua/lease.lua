-- Leases the oldest ready sandbox of a template whose host is alive; ready
-- sandboxes of dead hosts met on the way leave the pool.
-- ARGV: prefix, template, holder, now_ms, expires_at_ms, lease_id.
-- Returns {sandbox_id, host_id}, or nil when the queue has no live sandbox.
local p, tpl, holder, now, exp, lid = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local rk = p .. 'ready:' .. tpl
local hexpk = p .. 'host_expiry'
while true do
  local id = redis.call('RPOP', rk)
  if not id then
    return false
  end
  local sbk = p .. 'sb:' .. id
  local host = redis.call('HGET', sbk, 'host')
  if host then
    redis.call('SREM', p .. 'host_ready:' .. host, id)
    local until_ms = redis.call('ZSCORE', hexpk, host)
    if until_ms and tonumber(until_ms) > now then
      redis.call('HSET', sbk, 'state', 'leased')
      redis.call('HSET', p .. 'lease:' .. lid, 'sb', id, 'host', host, 'tpl', tpl, 'holder', holder, 'exp', exp)
      redis.call('ZADD', p .. 'lease_expiry', exp, lid)
      redis.call('HINCRBY', p .. 'leased', tpl, 1)
      return {id, host}
    end
    redis.call('DEL', sbk)
  end
end
