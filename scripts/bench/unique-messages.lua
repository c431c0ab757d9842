-- wrk: POST /messages with a body no other request sends (a counter per thread and connection).
-- FILLER (env) pads the content to the same size as pgbench's.
local counter = 0
local thread_id = 0
local filler = os.getenv("FILLER") or ""
local threads = {}

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
end

function request()
  counter = counter + 1
  local body = '{"content":"wrk ' .. tid .. '-' .. counter .. ' ' .. filler .. '"}'
  return wrk.format("POST", "/messages", {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
  if status ~= 201 then
    wrk.thread:set("failed", (wrk.thread:get("failed") or 0) + 1)
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, t in ipairs(threads) do failed = failed + (t:get("failed") or 0) end
  io.write(string.format("wrk-result requests=%d non201=%d seconds=%.3f p50_ms=%.2f p99_ms=%.2f\n",
    summary.requests, failed, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
