-- Forgets every host dead at now_ms and removes the ready and parked
-- sandboxes of every host not alive (dead, or never registered).
-- ARGV: prefix, now_ms.
-- Returns a flat array: sandbox_id, host_id, template for each removed.
local p, now = ARGV[1], ARGV[2]
local hexpk = p .. 'host_expiry'
local dead = redis.call('ZRANGEBYSCORE', hexpk, '-inf', now)
for _, host in ipairs(dead) do
  redis.call('ZREM', hexpk, host)
  redis.call('HDEL', p .. 'hosts', host)
end
local out = {}
local sbhostsk = p .. 'sb_hosts'
for _, host in ipairs(redis.call('SMEMBERS', sbhostsk)) do
  local readyk = p .. 'host_ready:' .. host
  local parkedk = p .. 'host_parked:' .. host
  if redis.call('ZSCORE', hexpk, host) then
    -- Alive (every dead one left host_expiry above); forget it here only
    -- when it holds nothing, so the set stays as small as the live pool.
    if redis.call('SCARD', readyk) == 0 and redis.call('SCARD', parkedk) == 0 then
      redis.call('SREM', sbhostsk, host)
    end
  else
    for _, id in ipairs(redis.call('SMEMBERS', readyk)) do
      local sbk = p .. 'sb:' .. id
      local tpl = redis.call('HGET', sbk, 'tpl')
      if tpl then
        redis.call('LREM', p .. 'ready:' .. tpl, 0, id)
        redis.call('DEL', sbk)
        out[#out + 1] = id
        out[#out + 1] = host
        out[#out + 1] = tpl
      end
    end
    for _, id in ipairs(redis.call('SMEMBERS', parkedk)) do
      local sbk = p .. 'sb:' .. id
      local v = redis.call('HMGET', sbk, 'tpl', 'owner')
      if v[1] then
        if v[2] then
          redis.call('SREM', p .. 'parked:' .. v[2], id)
        end
        redis.call('DEL', sbk)
        out[#out + 1] = id
        out[#out + 1] = host
        out[#out + 1] = v[1]
      end
    end
    redis.call('DEL', readyk, parkedk)
    redis.call('SREM', sbhostsk, host)
  end
end
return out
