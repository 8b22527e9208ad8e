-- Registers or refreshes a host until expires_at_ms.
-- ARGV: prefix, host_id, host JSON, expires_at_ms.
local p, host, json, exp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('HSET', p .. 'hosts', host, json)
redis.call('ZADD', p .. 'host_expiry', exp, host)
return 1
