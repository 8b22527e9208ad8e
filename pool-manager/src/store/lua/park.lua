-- Parks a sandbox for its owner alone, unless it is in the pool already.
-- ARGV: prefix, owner, sandbox_id, host_id, template. Returns 1 or 0.
local p, owner, id, host, tpl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local sbk = p .. 'sb:' .. id
if redis.call('EXISTS', sbk) == 1 then
  return 0
end
redis.call('HSET', sbk, 'host', host, 'tpl', tpl, 'state', 'parked', 'owner', owner)
redis.call('SADD', p .. 'parked:' .. owner, id)
redis.call('SADD', p .. 'host_parked:' .. host, id)
redis.call('SADD', p .. 'sb_hosts', host)
return 1
