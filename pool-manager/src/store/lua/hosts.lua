-- The JSON of every host alive at now_ms (read only).
-- ARGV: prefix, now_ms.
local p, now = ARGV[1], ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', p .. 'host_expiry', '(' .. now, '+inf')
local out = {}
for _, id in ipairs(ids) do
  local json = redis.call('HGET', p .. 'hosts', id)
  if json then
    out[#out + 1] = json
  end
end
return out
