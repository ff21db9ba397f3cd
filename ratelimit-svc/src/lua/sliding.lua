-- Exact sliding window. KEYS[1]: the key's admissions, a list of "time_us,cost", oldest first.
-- ARGV: limit, window (µs), cost (0 = peek). Time is Redis's, so replicas never disagree.
-- Returns {allowed, remaining, reset_after_us, retry_after_us, now_us}.
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

while true do
  local head = redis.call('LINDEX', key, 0)
  if not head then break end
  local at = tonumber(string.match(head, '^(%d+),'))
  if at + window <= now then redis.call('LPOP', key) else break end
end

local entries = redis.call('LRANGE', key, 0, -1)
local used = 0
for _, entry in ipairs(entries) do
  used = used + tonumber(string.match(entry, ',(%d+)$'))
end
local wanted = cost
if wanted == 0 then wanted = 1 end
local allowed = used + wanted <= limit
local retry = 0
if allowed and cost > 0 then
  redis.call('RPUSH', key, string.format('%.0f,%.0f', now, cost))
  used = used + cost
elseif not allowed then
  if wanted > limit then
    retry = window
  else
    local excess = used + wanted - limit
    local freed = 0
    for _, entry in ipairs(entries) do
      local at, c = string.match(entry, '^(%d+),(%d+)$')
      freed = freed + tonumber(c)
      if freed >= excess then
        retry = tonumber(at) + window - now
        break
      end
    end
  end
end

local reset = 0
local last = redis.call('LINDEX', key, -1)
if last then
  reset = tonumber(string.match(last, '^(%d+),')) + window - now
  redis.call('PEXPIRE', key, math.max(1, math.ceil(reset / 1000)))
end
local remaining = limit - used
if remaining < 0 then remaining = 0 end
return {allowed and 1 or 0, remaining, reset, retry, now}
