-- Puts a sandbox at the back of its template's ready queue, unless it is in
-- the pool already (ready, parked or leased): a retried add is a no-op.
-- ARGV: prefix, sandbox_id, host_id, template. Returns 1 if added, 0 if not.
local p, id, host, tpl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local sbk = p .. 'sb:' .. id
if redis.call('EXISTS', sbk) == 1 then
  return 0
end
redis.call('HSET', sbk, 'host', host, 'tpl', tpl, 'state', 'ready')
redis.call('LPUSH', p .. 'ready:' .. tpl, id)
redis.call('SADD', p .. 'host_ready:' .. host, id)
redis.call('SADD', p .. 'sb_hosts', host)
redis.call('SADD', p .. 'templates', tpl)
return 1
