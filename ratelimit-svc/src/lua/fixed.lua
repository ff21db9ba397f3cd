-- Fixed window (Envoy's semantics). KEYS[1]: a hash {w = window index, c = count}.
-- ARGV: limit, window (µs), cost (0 = peek). Returns {allowed, remaining, reset_after_us, retry_after_us, now_us}.
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local index = math.floor(now / window)
local stored = redis.call('HMGET', key, 'w', 'c')
local count = 0
if stored[1] and tonumber(stored[1]) == index then count = tonumber(stored[2]) end
local wanted = cost
if wanted == 0 then wanted = 1 end
local allowed = count + wanted <= limit
local reset = (index + 1) * window - now
if allowed and cost > 0 then
  count = count + cost
  redis.call('HSET', key, 'w', string.format('%.0f', index), 'c', count)
  redis.call('PEXPIRE', key, math.max(1, math.ceil(reset / 1000)))
end
local retry = 0
if not allowed then
  if wanted > limit then retry = window else retry = reset end
end
return {allowed and 1 or 0, limit - count, reset, retry, now}
