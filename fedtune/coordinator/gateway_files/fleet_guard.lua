-- fedtune gateway: the access check of every Fleet API request (nginx, lua-nginx-module).
--
-- Flower 1.41's SuperNode authentication signs only a timestamp, which the SuperLink accepts
-- for about 305 s on any path with any body, and it keeps no record of what it has seen: a
-- captured header set replays. This check refuses a (public key, timestamp) pair it has
-- already seen. The pair, not the signature, is the key: ECDSA signatures are malleable (a
-- second valid signature of the same timestamp is easy to make), the signed timestamp is not.
-- It also refuses timestamps older than the gateway's start, so a restart (which empties the
-- cache) opens no window, and names each request's key id for the access log.
--
-- Flooding: timestamps outside Flower's window are refused before they are recorded, and a
-- pair the SuperLink answers with 401 (no valid login) is forgotten once answered, so unsigned
-- junk does not fill the cache and push real logins out of it.
--
-- Loaded once by init_by_lua (in the master, before the workers drop privileges): the file
-- returns the checks, which access_by_lua and log_by_lua call for each request.

local seen = ngx.shared.fedtune_seen_auth
local WINDOW_S = 330 -- Flower's 300 s tolerance + 5 s clock drift, with a margin
local DRIFT_S = 5 -- Flower refuses a timestamp more than 5 s in the future

local function hex(bytes)
  return (bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- Seconds since the epoch of an ISO 8601 UTC timestamp as Flower writes it
-- (2026-12-03T09:41:03.123456+00:00); nil if it is not one.
local function epoch_seconds(text)
  local y, mo, d, h, mi, s, frac, zone = text:match(
    "^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)(%.?%d*)([%+%-Z].*)$")
  if not y or (zone ~= "Z" and zone ~= "+00:00") then
    return nil
  end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  -- days from civil (Howard Hinnant's algorithm)
  y = mo <= 2 and y - 1 or y
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * (mo + (mo > 2 and -3 or 9)) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  return days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
      + (tonumber("0" .. frac) or 0)
end

local function refuse(status, why, key_id)
  ngx.log(ngx.WARN, "fedtune-gateway: refused ", ngx.var.request_method, " ", ngx.var.uri,
    " from ", ngx.var.remote_addr, " key ", key_id or "-", ": ", why)
  return ngx.exit(status)
end

local guard = {}

function guard.check()
  local headers = ngx.req.get_headers()
  local public_key = headers["flwr-public-key"]
  local timestamp = headers["flwr-timestamp"]
  local signature = headers["flwr-signature"]
  if type(public_key) ~= "string" or type(timestamp) ~= "string"
      or type(signature) ~= "string" then
    return refuse(401, "missing or repeated node authentication headers")
  end

  local raw_key = ngx.decode_base64(public_key)
  if not raw_key then
    return refuse(401, "the public key header is not base64")
  end
  local key_hash = hex(ngx.sha1_bin(raw_key))
  local key_id = key_hash:sub(1, 16) -- fedtune's key id (fedtune.coordinator.gateway.key_id)
  ngx.var.fedtune_key_id = key_id

  local signed_at = epoch_seconds(timestamp)
  if not signed_at then
    return refuse(401, "the timestamp is not an ISO 8601 UTC time", key_id)
  end
  local now = ngx.now()
  if signed_at > now + DRIFT_S or signed_at < now - WINDOW_S then
    return refuse(401, "timestamp " .. timestamp .. " outside Flower's window", key_id)
  end
  local started = seen:get("gateway-started") or now
  if signed_at < started then
    return refuse(403, "signed before this gateway started (replay across a restart?)", key_id)
  end

  local pair = "auth:" .. key_hash .. ":" .. timestamp
  local ok, err, forcible = seen:add(pair, ngx.var.request_uri, WINDOW_S)
  if not ok then
    if err == "exists" then
      return refuse(403, "replayed node authentication (timestamp " .. timestamp
        .. " already used)", key_id)
    end
    return refuse(503, "replay cache: " .. tostring(err), key_id)
  end
  if forcible then
    ngx.log(ngx.WARN, "fedtune-gateway: replay cache full, unexpired entries evicted")
  end
  ngx.ctx.fedtune_pair = pair
end

-- After the answer: a pair the SuperLink refused as a login (401) was never a valid one.
function guard.forget()
  if ngx.ctx.fedtune_pair and ngx.status == 401 then
    seen:delete(ngx.ctx.fedtune_pair)
  end
end

return guard
