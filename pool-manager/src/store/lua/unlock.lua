-- Gives a lock up if owner holds it.
-- ARGV: prefix, name, owner. Returns 1 if it was released.
local k = ARGV[1] .. 'lock:' .. ARGV[2]
if redis.call('HGET', k, 'owner') == ARGV[3] then
  redis.call('DEL', k)
  return 1
end
return 0
