-- Counts per template with a target, a ready or a leased sandbox; forgets
-- templates that have none of these.
-- ARGV: prefix.
-- Returns a flat array: template, ready, leased, target for each.
local p = ARGV[1]
local targetsk, leasedk, templatesk = p .. 'targets', p .. 'leased', p .. 'templates'
local seen = {}
local names = {}
local function note(t)
  if not seen[t] then
    seen[t] = true
    names[#names + 1] = t
  end
end
for _, t in ipairs(redis.call('SMEMBERS', templatesk)) do note(t) end
for _, t in ipairs(redis.call('HKEYS', targetsk)) do note(t) end
for _, t in ipairs(redis.call('HKEYS', leasedk)) do note(t) end
local out = {}
for _, t in ipairs(names) do
  local ready = redis.call('LLEN', p .. 'ready:' .. t)
  local leased = tonumber(redis.call('HGET', leasedk, t) or '0')
  local target = tonumber(redis.call('HGET', targetsk, t) or '0')
  if ready == 0 then
    redis.call('SREM', templatesk, t)
  end
  if ready > 0 or leased > 0 or target > 0 then
    out[#out + 1] = t
    out[#out + 1] = ready
    out[#out + 1] = leased
    out[#out + 1] = target
  end
end
return out
