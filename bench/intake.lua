-- wrk script: POST one signed GitHub push delivery per request, each with its
-- own X-GitHub-Delivery id so that a receiver which dedupes still does all of
-- its work.  BENCH_BODY names the payload file, BENCH_SIGNATURE is its
-- X-Hub-Signature-256, BENCH_EVENT the X-GitHub-Event.

local counter = 0
local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("tid", threads)
end

function init(args)
   local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["X-GitHub-Event"] = os.getenv("BENCH_EVENT") or "push"
   wrk.headers["X-Hub-Signature-256"] = os.getenv("BENCH_SIGNATURE")
   wrk.headers["User-Agent"] = "GitHub-Hookshot/bench"
   prefix = string.format("%d-%d-%d-", os.time(), math.random(1, 1000000000),
                          tid or 0)
end

function request()
   counter = counter + 1
   wrk.headers["X-GitHub-Delivery"] = prefix .. counter
   return wrk.format()
end
