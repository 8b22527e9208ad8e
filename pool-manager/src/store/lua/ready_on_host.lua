-- The ready sandboxes on one host (read only).
-- ARGV: prefix, host_id.
-- Returns a flat array: sandbox_id, template for each.
local p, host = ARGV[1], ARGV[2]
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'host_ready:' .. host)) do
  local tpl = redis.call('HGET', p .. 'sb:' .. id, 'tpl')
  if tpl then
    out[#out + 1] = id
    out[#out + 1] = tpl
  end
end
return out
