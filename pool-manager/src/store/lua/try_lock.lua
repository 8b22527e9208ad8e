-- Takes or keeps a lock for owner until expires_at_ms, unless another owner
-- holds it past now_ms. Times are the caller's, as everywhere in the store.
-- ARGV: prefix, name, owner, now_ms, expires_at_ms. Returns 1 if held.
local p, name, owner, now, exp = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local k = p .. 'lock:' .. name
local v = redis.call('HMGET', k, 'owner', 'exp')
if v[1] and v[1] ~= owner and tonumber(v[2]) > now then
  return 0
end
redis.call('HSET', k, 'owner', owner, 'exp', exp)
return 1
