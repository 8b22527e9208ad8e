-- Sets a template's target; zero removes it.
-- ARGV: prefix, template, target.
local p, tpl, n = ARGV[1], ARGV[2], ARGV[3]
if tonumber(n) == 0 then
  redis.call('HDEL', p .. 'targets', tpl)
else
  redis.call('HSET', p .. 'targets', tpl, n)
end
return 1
