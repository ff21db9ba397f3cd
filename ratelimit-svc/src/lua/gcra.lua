-- GCRA. KEYS[1]: the key's theoretical arrival time (µs). ARGV: limit, window (µs), cost (0 = peek).
-- Returns {allowed, remaining, reset_after_us, retry_after_us, now_us}.
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local interval = math.max(1, math.floor(window / limit))
local tat = tonumber(redis.call('GET', key) or '0')
if tat < now then tat = now end
local wanted = cost
if wanted == 0 then wanted = 1 end
local new_tat = tat + wanted * interval
local allow_at = new_tat - window
local allowed = allow_at <= now
local current = tat
if allowed and cost > 0 then
  current = new_tat
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
end
local remaining = math.floor(math.max(0, window - (current - now)) / interval)
if remaining > limit then remaining = limit end
local retry = 0
if not allowed then retry = allow_at - now end
return {allowed and 1 or 0, remaining, current - now, retry, now}
