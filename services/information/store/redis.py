"""Redis store: one Redis shared by several replicas of the information
service. Every write that decides money (and every budget and price write)
is ONE Lua script, so a check and the hold it allows can never interleave
with another replica's request: Redis runs a script atomically.

Same observable behaviour as :class:`~.sqlite.SqliteStore` (the congruence
suite in tests/integration/test_information_store.py runs on both).

Keys, all under ``prefix``:

==========================  ===============================================
``budget:{id}``             hash: ``json`` (the record), ``scope`` (scope key)
``budgets``                 zset, score 0: every budget id (ordered listing)
``scope:{scope_key}``       set of the budget ids of that exact scope
``price:{model}\\0{backend}`` string: the price record as JSON
``prices``                  zset, score 0: ``{model}\\0{backend}`` (listing)
``ctr:{id}:{period}``       hash: spent/reserved micros/tokens (integers)
``fired:{id}:{period}``     set of the thresholds already fired
``res:{reservation_id}``    hash: the reservation (holds as JSON, amounts)
``reservations:open``       zset of the open reservations, score expiry;
                            member ``%020d`` sequence + reservation id, so
                            ties expire in creation order (as in SQLite)
``req:{request_id}``        hash: kind, fingerprint, result (JSON), ref,
                            ctrs (settle: JSON list of the counters charged)
``calls``                   zset, score time_us, member ``%020d`` sequence +
                            the call as JSON (ties in recording order)
``alerts``                  zset, score seq, member the alert as JSON
``alerts:seq`` etc.         counters
``alerts:time``             create_time_us of the last alert fired
``config:version``          integer, incremented by every budget or price
                            write (0 when absent)
``expiry:legacy``           the SCAN cursor of the pass that gives answers
                            and closed reservations written before they
                            expired their expiry; ``done`` once it is over
==========================  ===============================================

Amounts are integers everywhere. Lua numbers are doubles: the amounts of one
call (at most ``MAX_COST_MICROS_PER_CALL``, 10**15, and 2 * 10**12 tokens,
checked by the servicer before a script runs) and times stay below 2**53,
where doubles are exact; counters add in Redis's int64 (HINCRBY). Stored numbers come from
Python's ``str(int)`` or Lua's ``string.format('%d')``, never from Lua's
default number formatting (which would write ``1e+15``), and every JSON
document is assembled from fragments Python encoded, so no float reaches the
store. The scripts compute key names from the prefix and name the prefix as
their one key: on a Redis Cluster the prefix is a hash tag
(:func:`~hivemesh.runtime.redis.cluster_prefix`), so a script goes to the
shard that holds every key it touches (one script charges several budgets'
counters, so all the store's keys share one slot there).
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

import redis.asyncio as aioredis

from hivemesh.runtime.redis import cluster_prefix, open_redis, redis_failures
from hivemesh.services.information.store.base import (
    MODE_HARD, AlertRecord, BudgetChanged, BudgetExceeded, BudgetRecord, CallRecord, Counter,
    CreatedBudgetGone, Hold, IdempotencyConflict, Once, PriceRecord, ReleaseResult,
    ReservationNotFound, ReservationRecord, ReservationSettled, ReserveOp, ReserveResult,
    SettleOp, SettleResult, StaleConfig, alert_id, budget_from_json, budget_to_json,
    created_answer, created_by,
    holds_from_json, holds_to_json, price_from_json, price_to_json, replayed_release,
    shown_start)

DEFAULT_PREFIX = "hivemesh:info:"


# -- Lua ----------------------------------------------------------------------
# Every script takes the key prefix as ARGV[1] and builds its key names.

_PRELUDE = r"""
local P = ARGV[1]
-- The store's request TTL, written into the script when it is registered.
local REQUEST_TTL_MS = tonumber('@REQUEST_TTL_MS@')
local function fmt(n) return string.format('%d', n) end
-- Milliseconds a record is kept: the request TTL after `until_us`, counted
-- from `now_us` (both in the caller's clock, decimal strings).
local function keep_ms(until_us, now_us)
  local extra = math.floor((tonumber(until_us) - tonumber(now_us)) / 1000)
  if extra < 0 then extra = 0 end
  return fmt(REQUEST_TTL_MS + extra)
end
-- The negation of an integer written in decimal, as a string (exact).
local function neg(s)
  if s == '0' then return s end
  if string.sub(s, 1, 1) == '-' then return string.sub(s, 2) end
  return '-' .. s
end
local function rid_of(member) return string.sub(member, 21) end
-- Whether a * m >= b * n, exactly, for integers 0 <= a, b < 2^53 and small
-- 0 <= m, n (percentages): the products may pass 2^53, where doubles round
-- (a threshold would fire early). Each factor is split at 2^26 so that
-- every part stays exact.
local function times_ge(a, m, b, n)
  local B = 67108864
  local function split(x, k)
    local hi, lo = math.floor(x / B) * k, (x % B) * k
    local carry = math.floor(lo / B)
    return hi + carry, lo - carry * B
  end
  local h1, l1 = split(a, m)
  local h2, l2 = split(b, n)
  if h1 ~= h2 then return h1 > h2 end
  return l1 >= l2
end
-- Free the hold of an OPEN reservation and move it to `state` at `now_us`;
-- the reservation is kept a request TTL after it expires.
local function close_open(rid, state, now_us)
  local key = P .. 'res:' .. rid
  local r = redis.call('HMGET', key, 'micros', 'tokens', 'ctrs', 'member', 'expire_time_us')
  local nm, nt = neg(r[1]), neg(r[2])
  for _, ctr in ipairs(cjson.decode(r[3])) do
    redis.call('HINCRBY', P .. ctr, 'reserved_micros', nm)
    redis.call('HINCRBY', P .. ctr, 'reserved_tokens', nt)
  end
  redis.call('ZREM', P .. 'reservations:open', r[4])
  redis.call('HSET', key, 'state', state)
  redis.call('PEXPIRE', key, keep_ms(r[5], now_us))
  return r[1], r[2]
end
-- (kind, fingerprint, result, ref) of a known request, or nil.
local function seen_request(request_id)
  local r = redis.call('HMGET', P .. 'req:' .. request_id, 'kind', 'fingerprint', 'result', 'ref')
  if not r[1] then return nil end
  return r
end
-- Records a request's answer, kept `ms` milliseconds.
local function remember(request_id, kind, fingerprint, result, ref, ms)
  local key = P .. 'req:' .. request_id
  redis.call('HSET', key, 'kind', kind, 'fingerprint', fingerprint, 'result', result, 'ref', ref)
  redis.call('PEXPIRE', key, ms)
end
-- A write made idempotent by the caller (ARGV[2] its request_id, '' for
-- none; ARGV[3] the fingerprint): the reply for a retry, or nil when the
-- request is new; answer_once records a new request's answer.
local function replay_once(kind)
  if ARGV[2] == '' then return nil end
  local seen = seen_request(ARGV[2])
  if not seen then return nil end
  if seen[1] ~= kind or seen[2] ~= ARGV[3] then return {'conflict'} end
  return {'replay', seen[3]}
end
local function answer_once(kind, answer)
  if ARGV[2] ~= '' then remember(ARGV[2], kind, ARGV[3], answer, '', fmt(REQUEST_TTL_MS)) end
end
local function bump_config() redis.call('INCR', P .. 'config:version') end
-- `s` escaped for a SCAN MATCH pattern.
local function glob(s) return (string.gsub(s, '[%*%?%[%]\\]', '\\%0')) end
-- True when the caller's configuration version (a decimal string, '-1' = do
-- not check) is not the current one.
local function stale(seen)
  if seen == '-1' then return false end
  return seen ~= (redis.call('GET', P .. 'config:version') or '0')
end
-- The counters of `ctrs` (keys 'ctr:{id}:{period}' without prefix), each as
-- {spent_micros, spent_tokens, reserved_micros, reserved_tokens, fired}: the
-- numbers as Redis stores them (decimal strings), fired unsorted.
local function counters_of(ctrs)
  local out = {}
  for i, ctr in ipairs(ctrs) do
    local c = redis.call('HMGET', P .. ctr, 'spent_micros', 'spent_tokens', 'reserved_micros',
                         'reserved_tokens')
    local fired = redis.call('SMEMBERS', P .. 'fired:' .. string.sub(ctr, 5))
    out[i] = {c[1] or '0', c[2] or '0', c[3] or '0', c[4] or '0', fired}
  end
  return out
end
"""

# ARGV: prefix, request_id, fingerprint, budget_id, json, scope_key, result
_CREATE_BUDGET = _PRELUDE + r"""
local seen = seen_request(ARGV[2])
if seen then
  if seen[1] ~= 'create_budget' or seen[2] ~= ARGV[3] then return {'conflict'} end
  local j = redis.call('HGET', P .. 'budget:' .. seen[4], 'json')
  if not j then return {'gone', seen[4]} end
  return {'replay', j, seen[3]}
end
local key = P .. 'budget:' .. ARGV[4]
if redis.call('EXISTS', key) == 1 then return {'exists'} end
redis.call('HSET', key, 'json', ARGV[5], 'scope', ARGV[6])
redis.call('ZADD', P .. 'budgets', 0, ARGV[4])
redis.call('SADD', P .. 'scope:' .. ARGV[6], ARGV[4])
remember(ARGV[2], 'create_budget', ARGV[3], ARGV[7], ARGV[4], fmt(REQUEST_TTL_MS))
bump_config()
return {'ok'}
"""

# ARGV: prefix, request_id, fingerprint, budget_id, json, scope_key,
#       expected json ('' = write whatever is stored)
_PUT_BUDGET = _PRELUDE + r"""
local replay = replay_once('update_budget')
if replay then return replay end
local key = P .. 'budget:' .. ARGV[4]
if ARGV[7] ~= '' and redis.call('HGET', key, 'json') ~= ARGV[7] then return {'changed'} end
local old = redis.call('HGET', key, 'scope')
if old and old ~= ARGV[6] then redis.call('SREM', P .. 'scope:' .. old, ARGV[4]) end
redis.call('HSET', key, 'json', ARGV[5], 'scope', ARGV[6])
redis.call('ZADD', P .. 'budgets', 0, ARGV[4])
redis.call('SADD', P .. 'scope:' .. ARGV[6], ARGV[4])
bump_config()
answer_once('update_budget', ARGV[5])
return {'ok'}
"""

# ARGV: prefix, request_id, fingerprint, budget_id. Its counters and fired thresholds of every period
# and its alerts go with it, and its holds leave the reservations not committed yet (their
# 'ctrs', which releases and expiries free and commits charge): a budget
# created again starts from nothing.
# Budget writes are rare; this one scans its keys.
_DELETE_BUDGET = _PRELUDE + r"""
local replay = replay_once('delete_budget')
if replay then return replay end
local id = ARGV[4]
local key = P .. 'budget:' .. id
local scope = redis.call('HGET', key, 'scope')
if not scope then
  answer_once('delete_budget', '{"deleted": false}')
  return {'ok', 0}
end
redis.call('DEL', key)
redis.call('ZREM', P .. 'budgets', id)
redis.call('SREM', P .. 'scope:' .. scope, id)
-- 'kind:{id}:{period}' with a period of digits only (another id may extend this one).
local function is_mine(name, kind)
  local head = kind .. ':' .. id .. ':'
  return string.sub(name, 1, #head) == head and string.match(string.sub(name, #head + 1), '^%-?%d+$')
end
for _, kind in ipairs({'ctr', 'fired'}) do
  local cursor = '0'
  repeat
    local r = redis.call('SCAN', cursor, 'MATCH', glob(P .. kind .. ':' .. id .. ':') .. '*',
                         'COUNT', 1000)
    cursor = r[1]
    for _, k in ipairs(r[2]) do
      if is_mine(string.sub(k, #P + 1), kind) then redis.call('DEL', k) end
    end
  until cursor == '0'
end
-- Its alerts too: a budget created again fires them again, under their ids.
for _, a in ipairs(redis.call('ZRANGE', P .. 'alerts', 0, -1)) do
  if cjson.decode(a).budget_id == id then redis.call('ZREM', P .. 'alerts', a) end
end
-- Every reservation not committed yet (a released or lapsed one may still
-- be committed) holds it no more.
local cursor = '0'
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', glob(P .. 'res:') .. '*', 'COUNT', 1000)
  cursor = r[1]
  for _, rkey in ipairs(r[2]) do
    local f = redis.call('HMGET', rkey, 'state', 'ctrs')
    if f[1] and f[1] ~= 'committed' and f[2] then
      local ctrs = cjson.decode(f[2])
      local kept = {}
      for _, c in ipairs(ctrs) do
        if not is_mine(c, 'ctr') then table.insert(kept, c) end
      end
      if #kept ~= #ctrs then
        redis.call('HSET', rkey, 'ctrs', #kept == 0 and '[]' or cjson.encode(kept))
      end
    end
  end
until cursor == '0'
bump_config()
answer_once('delete_budget', '{"deleted": true}')
return {'ok', 1}
"""

# ARGV: prefix, request_id, fingerprint, member (model \0 backend), json
_SET_PRICE = _PRELUDE + r"""
local replay = replay_once('set_price')
if replay then return replay end
local key = P .. 'price:' .. ARGV[4]
local existed = redis.call('EXISTS', key)
redis.call('SET', key, ARGV[5])
redis.call('ZADD', P .. 'prices', 0, ARGV[4])
bump_config()
answer_once('set_price', '{"price": ' .. ARGV[5] .. ', "replaced": ' ..
            (existed == 1 and 'true' or 'false') .. '}')
return {'ok', existed}
"""

# ARGV: prefix, request_id, fingerprint, reservation_id, micros, tokens,
#       expire_time_us, now_us, holds_json, ctrs_json, result_head, tenant_id,
#       workflow_id, agent_id, n, config_version ('-1' = do not check), then per
#       hold (6 each): ctr key (no prefix), budget_id, budget_id as JSON,
#       limit_micros ('' = none), limit_tokens ('' = none), '1' if HARD else '0'
# Replies {status, result, counters of the holds (as counters_of)}.
_RESERVE = _PRELUDE + r"""
local n = tonumber(ARGV[15])
local function hold_counters()
  local ctrs = {}
  for i = 0, n - 1 do ctrs[i + 1] = ARGV[17 + i * 6] end
  return counters_of(ctrs)
end
local seen = seen_request(ARGV[2])
local rid = ARGV[4]
local lapsed = nil  -- the zset member of the retried reservation, if it lapsed
if seen then
  if seen[1] ~= 'reserve' or seen[2] ~= ARGV[3] then return {'conflict'} end
  local r = redis.call('HMGET', P .. 'res:' .. seen[4], 'state', 'micros', 'tokens',
                       'expire_time_us', 'member')
  local state = r[1]
  -- Open but past its expiry (not swept yet): its hold no longer counts
  -- (the reserves below free it), so the retry must not be told it holds.
  if state == 'open' and tonumber(r[4]) <= tonumber(ARGV[8]) then
    lapsed = r[5]
  elseif state ~= 'released' and state ~= 'expired' then
    return {'replay', seen[3], hold_counters(), r[2] or '', r[3] or ''}
  end
  -- Its hold is gone (released, or lapsed): a retry holds again, checked
  -- against the budget as it is now, under the same reservation id.
  rid = seen[4]
end
if stale(ARGV[16]) then return {'stale'} end
local key = P .. 'res:' .. rid
if not seen and redis.call('EXISTS', key) == 1 then return {'duplicate'} end
-- Reservations past their expiry: released below, but only if the request is
-- admitted (a refused request writes nothing); the checks already count them
-- as released.
local expired = redis.call('ZRANGEBYSCORE', P .. 'reservations:open', '-inf', ARGV[8],
                           'LIMIT', 0, 100)
if lapsed then
  local listed = false
  for _, member in ipairs(expired) do listed = listed or member == lapsed end
  if not listed then table.insert(expired, lapsed) end
end
local freed = {}
for _, member in ipairs(expired) do
  local r = redis.call('HMGET', P .. 'res:' .. rid_of(member), 'micros', 'tokens', 'ctrs')
  local m, t = tonumber(r[1]), tonumber(r[2])
  for _, ctr in ipairs(cjson.decode(r[3])) do
    local f = freed[ctr] or {0, 0}
    f[1] = f[1] + m
    f[2] = f[2] + t
    freed[ctr] = f
  end
end
local micros, tokens = tonumber(ARGV[5]), tonumber(ARGV[6])
local soft, soft_seen = {}, {}
for i = 0, n - 1 do
  local b = 17 + i * 6
  local ctr, bid, bid_json, mode = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 5]
  local c = redis.call('HMGET', P .. ctr, 'spent_micros', 'spent_tokens', 'reserved_micros',
                       'reserved_tokens')
  local f = freed[ctr] or {0, 0}
  local units = {
    {'micros', ARGV[b + 3], tonumber(c[1] or '0'), tonumber(c[3] or '0') - f[1], micros, ARGV[5]},
    {'tokens', ARGV[b + 4], tonumber(c[2] or '0'), tonumber(c[4] or '0') - f[2], tokens, ARGV[6]}}
  for _, u in ipairs(units) do
    if u[2] ~= '' and u[3] + u[4] + u[5] > tonumber(u[2]) then
      if mode == '1' then
        return {'exceeded', bid, u[1], u[2], fmt(u[3]), fmt(u[4]), u[6]}
      end
      if not soft_seen[bid] then
        soft_seen[bid] = true
        table.insert(soft, bid_json)
      end
    end
  end
end
for _, member in ipairs(expired) do close_open(rid_of(member), 'expired', ARGV[8]) end
for i = 0, n - 1 do
  local ctr = P .. ARGV[17 + i * 6]
  redis.call('HINCRBY', ctr, 'reserved_micros', ARGV[5])
  redis.call('HINCRBY', ctr, 'reserved_tokens', ARGV[6])
end
local seq = redis.call('INCR', P .. 'reservations:seq')
local member = string.format('%020d', seq) .. rid
redis.call('HSET', key, 'request_id', ARGV[2], 'state', 'open', 'holds', ARGV[9],
           'micros', ARGV[5], 'tokens', ARGV[6], 'expire_time_us', ARGV[7],
           'tenant_id', ARGV[12], 'workflow_id', ARGV[13], 'agent_id', ARGV[14],
           'ctrs', ARGV[10], 'member', member)
redis.call('PERSIST', key)  -- reopened: kept while open
redis.call('ZADD', P .. 'reservations:open', ARGV[7], member)
local head = ARGV[11]
if seen then  -- the same answer under the first reservation id
  local rest = string.find(head, ', "expire_time_us": ', 1, true)
  head = '{"reservation_id": ' .. cjson.encode(rid) .. string.sub(head, rest)
end
local result = head .. table.concat(soft, ', ') .. ']}'
remember(ARGV[2], 'reserve', ARGV[3], result, rid, keep_ms(ARGV[7], ARGV[8]))
return {seen and 'reopened' or 'ok', result, hold_counters()}
"""

# ARGV: prefix, request_id, fingerprint, reservation_id ('' = track),
#       expected ('1' the caller read the reservation, '0' it found none),
#       cost_micros, tokens, call time_us, call JSON, result_head, n,
#       config_version the holds were computed under ('-1' = do not check),
#       now (when the request arrived: the time of its alerts), then per
#       hold: ctr key, fired key, limit_micros ('' when none), limit_tokens
#       (same), alert JSON fragment, budget_id as JSON, [budget_id,
#       period_start_us] as JSON, m, then m x (threshold, alert_id JSON).
#       The script completes result_head with the budgets it charged.
# Replies {status, result, counters of the holds charged (as counters_of)}.
_SETTLE = _PRELUDE + r"""
local seen = seen_request(ARGV[2])
if seen then
  if seen[1] ~= 'settle' or seen[2] ~= ARGV[3] then return {'conflict'} end
  local ctrs = redis.call('HGET', P .. 'req:' .. ARGV[2], 'ctrs')
  return {'replay', seen[3], ctrs and counters_of(cjson.decode(ctrs)) or {}}
end
local released = false
local held = nil
-- A track's holds, or a commit's holds as their budgets are defined now,
-- were computed under this configuration version.
if stale(ARGV[12]) then return {'stale'} end
if ARGV[4] ~= '' then
  local key = P .. 'res:' .. ARGV[4]
  local state = redis.call('HGET', key, 'state')
  if not state then return {'notfound'} end
  -- The caller read the holds before: only a retried Reserve changes them,
  -- but the reservation may have been created in between.
  if ARGV[5] ~= '1' then return {'retry'} end
  if state == 'committed' then return {'settled'} end
  -- The budgets it still holds (a deleted budget's hold was taken out).
  held = {}
  for _, ctr in ipairs(cjson.decode(redis.call('HGET', key, 'ctrs'))) do held[ctr] = true end
  -- Holds the caller remembered may be older than the reservation's (another
  -- replica held it again since, in another period or with other budgets):
  -- it reads them again.
  local listed, j = {}, 14
  for _ = 1, tonumber(ARGV[11]) do
    listed[ARGV[j]] = true
    j = j + 8 + 2 * tonumber(ARGV[j + 7])
  end
  for ctr in pairs(held) do
    if not listed[ctr] then return {'retry'} end
  end
  if state == 'open' then
    close_open(ARGV[4], 'committed', ARGV[8])
    released = true
  else
    redis.call('HSET', key, 'state', 'committed')
  end
end
local alerts = {}
-- The holds charged (a commit's may have lost some): ids and keys as JSON,
-- counter keys.
local charged_ids, charged_keys, charged_ctrs = {}, {}, {}
-- When an alert fires: now (ARGV[13]), but after the last alert's time, so
-- that alerts are strictly ordered by it (as in SQLite).
local function alert_time()
  local t = tonumber(ARGV[13])
  local last = redis.call('ZRANGE', P .. 'alerts', -1, -1)[1]
  if last then
    local after = cjson.decode(last).create_time_us + 1
    if after > t then t = after end
  end
  -- Kept apart from the alerts: the latest one goes with its budget.
  local kept = redis.call('GET', P .. 'alerts:time')
  if kept and tonumber(kept) + 1 > t then t = tonumber(kept) + 1 end
  redis.call('SET', P .. 'alerts:time', fmt(t))
  return fmt(t)
end
local n = tonumber(ARGV[11])
local i = 14
for _ = 1, n do
  local ctr, fired, lim_m, lim_t, frag = P .. ARGV[i], P .. ARGV[i + 1], ARGV[i + 2],
                                         ARGV[i + 3], ARGV[i + 4]
  local charged = held == nil or held[ARGV[i]]
  if charged then
    table.insert(charged_ids, ARGV[i + 5])
    table.insert(charged_keys, ARGV[i + 6])
    table.insert(charged_ctrs, ARGV[i])
  end
  local m = tonumber(ARGV[i + 7])
  i = i + 8
  local sm, st = 0, 0
  if charged then
    sm = redis.call('HINCRBY', ctr, 'spent_micros', ARGV[6])
    st = redis.call('HINCRBY', ctr, 'spent_tokens', ARGV[7])
  end
  for _ = 1, m do
    local th, aid = ARGV[i], ARGV[i + 1]
    i = i + 2
    local kind = nil
    if not charged then lim_m, lim_t = '', '' end
    if lim_m ~= '' and times_ge(sm, 100, tonumber(lim_m), tonumber(th)) then
      kind = '1'
    elseif lim_t ~= '' and times_ge(st, 100, tonumber(lim_t), tonumber(th)) then
      kind = '2'
    end
    if kind and redis.call('SADD', fired, th) == 1 then
      local seq = redis.call('INCR', P .. 'alerts:seq')
      local alert = '{' .. frag .. ', "create_time_us": ' .. alert_time() ..
                    ', "alert_id": ' .. aid .. ', "threshold_percent": ' .. th ..
                    ', "limit_kind": ' .. kind .. ', "spent_micros": ' .. fmt(sm) ..
                    ', "spent_tokens": ' .. fmt(st) .. ', "seq": ' .. fmt(seq) .. '}'
      redis.call('ZADD', P .. 'alerts', seq, alert)
      table.insert(alerts, alert)
    end
  end
end
local call_seq = redis.call('INCR', P .. 'calls:seq')
redis.call('ZADD', P .. 'calls', ARGV[8], string.format('%020d', call_seq) .. ARGV[9])
local result = ARGV[10] .. '"budget_ids": [' .. table.concat(charged_ids, ', ') ..
               '], "keys": [' .. table.concat(charged_keys, ', ') .. '], "hold_released": ' ..
               (released and 'true' or 'false') .. ', "alerts": [' ..
               table.concat(alerts, ', ') .. ']}'
remember(ARGV[2], 'settle', ARGV[3], result, ARGV[4], fmt(REQUEST_TTL_MS))
redis.call('HSET', P .. 'req:' .. ARGV[2], 'ctrs',
           #charged_ctrs == 0 and '[]' or cjson.encode(charged_ctrs))
return {'ok', result, counters_of(charged_ctrs)}
"""

# ARGV: prefix, request_id, fingerprint, reservation_id, now_us
_RELEASE = _PRELUDE + r"""
local replay = replay_once('release')
if replay then return replay end
local r = redis.call('HMGET', P .. 'res:' .. ARGV[4], 'state', 'expire_time_us')
local state = r[1]
if not state then return {'notfound'} end
if state == 'open' and tonumber(r[2]) <= tonumber(ARGV[5]) then
  -- It expired before this release (not swept yet): freed as expired, and
  -- not released by this call.
  close_open(ARGV[4], 'expired', ARGV[5])
  state = 'expired'
end
if state ~= 'open' then
  answer_once('release', '{"released": false, "micros": 0, "tokens": 0}')
  return {'no'}
end
local m, t = close_open(ARGV[4], 'released', ARGV[5])
answer_once('release', '{"released": true, "micros": ' .. m .. ', "tokens": ' .. t .. '}')
return {'ok', m, t}
"""

# ARGV: prefix, now_us, limit
_EXPIRE = _PRELUDE + r"""
local expired = redis.call('ZRANGEBYSCORE', P .. 'reservations:open', '-inf', ARGV[2],
                           'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(expired) do close_open(rid_of(member), 'expired', ARGV[2]) end
return #expired
"""

# ARGV: prefix, history_before_us, limit. Request answers and closed
# reservations expire by themselves (PEXPIRE); recorded calls (scored by
# time) and alerts (scored by sequence, in time order) older than the cut go.
_PRUNE = _PRELUDE + r"""
local cut, limit = ARGV[2], tonumber(ARGV[3])
local old = redis.call('ZCOUNT', P .. 'calls', '-inf', '(' .. cut)
if old > limit then old = limit end
if old > 0 then redis.call('ZREMRANGEBYRANK', P .. 'calls', 0, old - 1) end
local alerts = 0
for _, a in ipairs(redis.call('ZRANGE', P .. 'alerts', 0, limit - 1)) do
  if cjson.decode(a).create_time_us >= tonumber(cut) then break end
  redis.call('ZREM', P .. 'alerts', a)
  alerts = alerts + 1
end
return old + alerts
"""

# ARGV: prefix, now_us, count. One step of a SCAN (COUNT `count`) of this
# prefix's answers and reservations: those written before answers and closed
# reservations expired (no TTL) get the expiry the scripts give them now, a
# request TTL from `now_us` (a Reserve answer and a closed reservation a
# request TTL after the reservation expires). Open reservations keep none
# (closing one gives it its expiry); no other key is touched. The cursor is
# kept in 'expiry:legacy', so any replica resumes the pass; 'done' ends it.
# Replies {keys given an expiry, 1 when the pass is over}.
_EXPIRE_LEGACY = _PRELUDE + r"""
local mark = P .. 'expiry:legacy'
local cursor = redis.call('GET', mark) or '0'
if cursor == 'done' then return {0, 1} end
local r = redis.call('SCAN', cursor, 'MATCH', glob(P) .. 're[qs]:*', 'COUNT', ARGV[3])
local n = 0
for _, key in ipairs(r[2]) do
  if redis.call('PTTL', key) == -1 then
    local ms = nil
    if string.sub(key, #P + 3, #P + 3) == 'q' then
      local f = redis.call('HMGET', key, 'kind', 'ref')
      local until_us = f[1] == 'reserve' and redis.call('HGET', P .. 'res:' .. f[2],
                                                       'expire_time_us')
      ms = until_us and keep_ms(until_us, ARGV[2]) or fmt(REQUEST_TTL_MS)
    else
      local f = redis.call('HMGET', key, 'state', 'expire_time_us')
      if f[1] ~= 'open' then ms = keep_ms(f[2], ARGV[2]) end
    end
    if ms then
      redis.call('PEXPIRE', key, ms)
      n = n + 1
    end
  end
end
local done = r[1] == '0'
redis.call('SET', mark, done and 'done' or r[1])
return {n, done and 1 or 0}
"""


# -- helpers ------------------------------------------------------------------

def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _num(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _once_args(once: Once | None) -> tuple[str, str]:
    return (once.request_id, once.fingerprint) if once is not None else ("", "")


def _replayed(reply, once: Once | None):
    """The recorded answer (parsed) when ``reply`` replays ``once``, else None."""
    status = _s(reply[0])
    if status == "conflict":
        raise IdempotencyConflict(once.request_id if once else "")
    return json.loads(reply[1]) if status == "replay" else None


def _price_member(model: str, backend: str) -> str:
    return f"{model}\x00{backend}"


def _ctr(budget_id: str, period_start_us: int) -> str:
    return f"ctr:{budget_id}:{period_start_us}"


def _fired(budget_id: str, period_start_us: int) -> str:
    return f"fired:{budget_id}:{period_start_us}"


def _counters(keys, replies) -> tuple[Counter, ...]:
    """Counters from a script's reply (see ``counters_of`` in the Lua
    prelude) for the (budget_id, period_start_us) pairs they were read for."""
    return tuple(Counter(budget_id, period, *(int(v) for v in reply[:4]),
                         tuple(sorted(int(t) for t in reply[4])))
                 for (budget_id, period), reply in zip(keys, replies, strict=True))


def _settle_result(text, replayed: bool, counter_replies) -> SettleResult:
    d = json.loads(text)
    # Results remembered before counters and call contexts were: none of either.
    keys = [tuple(k) for k in d.get("keys", [])]
    return SettleResult(d["cost_micros"], tuple(AlertRecord(**a) for a in d["alerts"]),
                        d["hold_released"], replayed, tuple(d["budget_ids"]),
                        _counters(keys, counter_replies) if keys else (),
                        tuple(d.get("call_context", ("", "", ""))), d.get("unpriced", False))


def _reserve_result(reply, replayed: bool, holds: tuple[Hold, ...]) -> ReserveResult:
    """``reply``: {status, result, counters[, micros, tokens of a replay]}."""
    d = json.loads(reply[1])
    keys = [(h.budget_id, h.period_start_us) for h in holds]
    held = [int(v) if _s(v) else None for v in reply[3:5]] if len(reply) > 3 else [None, None]
    return ReserveResult(d["reservation_id"], d["expire_time_us"],
                         tuple(d["over_soft_limit"]), replayed,
                         _counters(keys, reply[2]), *held, d.get("unpriced", False))


# Reservations made through this store whose holds and ids it remembers, so
# that settling one skips reading them back from Redis (most calls are
# settled by the replica that reserved them).
_RECENT_RESERVATIONS = 4096

# Keys one step of the pass over keys written before expiry looks at (SCAN's
# COUNT): each step is one short script.
_LEGACY_SCAN_COUNT = 1000


class RedisStore:
    name = "redis"
    failures = redis_failures()

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX, *,
                 request_ttl_s: float = 86400.0) -> None:
        """``request_ttl_s``: how long answers to request ids are kept (on
        Redis's clock), and closed reservations after their expiry."""
        self.client = client
        self.prefix = prefix
        self._p = prefix.encode()
        # reservation_id -> (holds, tenant_id, workflow_id, agent_id), as
        # written by reserve (a retried Reserve through another replica may
        # hold it again with other holds: the settle script then says retry).
        self._recent: OrderedDict[str, tuple] = OrderedDict()
        # Budget definitions as of config version _defs_version (None: not
        # read yet): a commit charges its holds with the limits and
        # thresholds their budgets have now; the script checks the version.
        self._defs: dict[str, BudgetRecord | None] = {}
        self._defs_version: int | None = None
        ttl_ms = str(max(1, int(request_ttl_s * 1000)))

        def register(script: str):
            return client.register_script(script.replace("@REQUEST_TTL_MS@", ttl_ms))
        self._create_budget = register(_CREATE_BUDGET)
        self._put_budget = register(_PUT_BUDGET)
        self._delete_budget = register(_DELETE_BUDGET)
        self._set_price = register(_SET_PRICE)
        self._reserve = register(_RESERVE)
        self._settle = register(_SETTLE)
        self._release = register(_RELEASE)
        self._expire = register(_EXPIRE)
        self._prune = register(_PRUNE)
        self._expire_legacy = register(_EXPIRE_LEGACY)
        # Set once the pass over keys written before expiry is seen over.
        self._legacy_done = False

    @classmethod
    async def open(cls, url: str, prefix: str = DEFAULT_PREFIX, *, cluster: bool = False,
                   request_ttl_s: float = 86400.0) -> RedisStore:
        """Connect to ``url`` (with ``cluster``, to the Redis Cluster of that
        node, keys under ``prefix`` as a hash tag) and check that Redis
        answers; raises :class:`hivemesh.runtime.redis.RedisUnavailable` (a
        ``ConnectionError``) when it does not."""
        if cluster:
            prefix = cluster_prefix(prefix)
        return cls(await open_redis(url, cluster=cluster, socket_connect_timeout=5), prefix,
                   request_ttl_s=request_ttl_s)

    def _key(self, suffix: str | bytes) -> bytes:
        return self._p + _b(suffix)

    async def _run(self, script, *args) -> list:
        # The prefix is the key the script declares: on a cluster, the hash
        # tag that sends it to the shard of every key it builds from it.
        reply = await script(keys=[self.prefix], args=[self.prefix, *args])
        return reply

    async def config_version(self) -> int:
        """Incremented (in the same script) by every budget or price write."""
        value = await self.client.get(self._key("config:version"))
        return int(value) if value is not None else 0

    # budgets --------------------------------------------------------------
    async def create_budget(self, budget: BudgetRecord, request_id: str, fingerprint: str):
        reply = await self._run(self._create_budget, request_id, fingerprint, budget.budget_id,
                                budget_to_json(budget), budget.scope_key,
                                json.dumps(created_answer(budget)))
        status = _s(reply[0])
        if status == "conflict":
            raise IdempotencyConflict(request_id)
        if status == "gone":
            raise CreatedBudgetGone(_s(reply[1]))
        if status == "exists":
            raise KeyError(budget.budget_id)
        if status == "replay":
            stored = budget_from_json(reply[1])
            if not created_by(json.loads(reply[2]), stored):
                raise CreatedBudgetGone(stored.budget_id)
            return stored, True
        return budget, False

    async def put_budget(self, budget: BudgetRecord, *, expected: BudgetRecord | None = None,
                         once: Once | None = None) -> tuple[BudgetRecord, bool]:
        reply = await self._run(self._put_budget, *_once_args(once), budget.budget_id,
                                budget_to_json(budget), budget.scope_key,
                                budget_to_json(expected) if expected is not None else "")
        seen = _replayed(reply, once)
        if seen is not None:
            return budget_from_json(seen), True
        if _s(reply[0]) == "changed":
            raise BudgetChanged(budget.budget_id)
        return budget, False

    async def answer(self, kind: str, once: Once) -> dict | None:
        seen = await self.client.hmget(self._key(f"req:{once.request_id}"),
                                       ["kind", "fingerprint", "result"])
        if seen[0] is None:
            return None
        if _s(seen[0]) != kind or _s(seen[1]) != once.fingerprint:
            raise IdempotencyConflict(once.request_id)
        return json.loads(seen[2])

    async def get_budget(self, budget_id: str) -> BudgetRecord | None:
        text = await self.client.hget(self._key(f"budget:{budget_id}"), "json")
        return budget_from_json(text) if text is not None else None

    async def _budgets(self, ids: list) -> list[BudgetRecord]:
        """The budgets of ``ids`` that still exist, in the order given."""
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for budget_id in ids:
            pipe.hget(self._key(b"budget:" + _b(budget_id)), "json")
        return [budget_from_json(t) for t in await pipe.execute() if t is not None]

    async def list_budgets(self, scope_filter, limit, after_id):
        wanted = [(f, v) for f, v in zip(("tenant_id", "workflow_id", "agent_id"), scope_filter,
                                         strict=True) if v]
        out: list[BudgetRecord] = []
        if limit == 0:
            return out
        # A filter may skip many ids: read the index in chunks.
        chunk = 256 if wanted or limit < 0 else limit
        cursor = b"(" + _b(after_id)
        while limit < 0 or len(out) < limit:
            ids = await self.client.zrangebylex(self._key("budgets"), cursor, b"+", 0, chunk)
            if not ids:
                break
            for b in await self._budgets(ids):
                if all(getattr(b, f) == v for f, v in wanted):
                    out.append(b)
                    if len(out) == limit:
                        break
            cursor = b"(" + _b(ids[-1])
        return out

    async def budgets_for_scopes(self, scope_keys):
        if not scope_keys:
            return []
        ids = await self.client.sunion([self._key(f"scope:{k}") for k in scope_keys])
        # By budget_id as SQLite orders text: UTF-8 bytes (= code points).
        return await self._budgets(sorted(_b(i) for i in ids))

    async def delete_budget(self, budget_id: str, *, once: Once | None = None
                            ) -> tuple[bool, bool]:
        reply = await self._run(self._delete_budget, *_once_args(once), budget_id)
        seen = _replayed(reply, once)
        if seen is not None:
            return seen["deleted"], True
        return bool(int(reply[1])), False

    # prices ---------------------------------------------------------------
    async def set_price(self, p: PriceRecord, *, once: Once | None = None
                        ) -> tuple[PriceRecord, bool, bool]:
        reply = await self._run(self._set_price, *_once_args(once),
                                _price_member(p.model, p.backend), price_to_json(p))
        seen = _replayed(reply, once)
        if seen is not None:
            return price_from_json(seen["price"]), seen["replaced"], True
        return p, bool(int(reply[1])), False

    async def get_price(self, model: str, backend: str) -> PriceRecord | None:
        texts = await self.client.mget([self._key(f"price:{_price_member(model, backend)}"),
                                        self._key(f"price:{_price_member(model, '')}")])
        for text in texts:
            if text is not None:
                return price_from_json(text)
        return None

    async def list_prices(self, model, limit, after):
        low, high = b"-", b"+"
        if model:
            low, high = b"[" + _b(_price_member(model, "")), b"(" + _b(model + "\x01")
        if after is not None:
            after_member = _b(_price_member(*after))
            if model == "" or after_member >= low[1:]:
                low = b"(" + after_member
        if limit == 0:
            return []
        members = await self.client.zrangebylex(self._key("prices"), low, high, 0, limit)
        if not members:
            return []
        texts = await self.client.mget([self._key(b"price:" + _b(m)) for m in members])
        return [price_from_json(t) for t in texts if t is not None]

    # the ledger -----------------------------------------------------------
    async def reserve(self, op: ReserveOp) -> ReserveResult:
        per_hold: list[str] = []
        for h in op.holds:
            per_hold += [_ctr(h.budget_id, h.period_start_us), h.budget_id,
                         json.dumps(h.budget_id), _num(h.limit_micros), _num(h.limit_tokens),
                         "1" if h.mode == MODE_HARD else "0"]
        head = json.dumps({"reservation_id": op.reservation_id,
                           "expire_time_us": op.expire_time_us,
                           "unpriced": op.unpriced})[:-1] + ', "over_soft_limit": ['
        reply = await self._run(
            self._reserve, op.request_id, op.fingerprint, op.reservation_id, _num(op.micros),
            _num(op.tokens), _num(op.expire_time_us), _num(op.now_us), holds_to_json(op.holds),
            json.dumps([_ctr(h.budget_id, h.period_start_us) for h in op.holds]), head,
            op.tenant_id, op.workflow_id, op.agent_id, str(len(op.holds)),
            str(int(op.config_version)), *per_hold)
        status = _s(reply[0])
        if status == "conflict":
            raise IdempotencyConflict(op.request_id)
        if status == "stale":
            raise StaleConfig()
        if status == "exceeded":
            budget_id, unit, limit, spent, reserved, requested = map(_s, reply[1:])
            raise BudgetExceeded(budget_id, unit, int(limit), int(spent), int(reserved),
                                 int(requested))
        if status == "duplicate":
            raise KeyError(op.reservation_id)
        result = _reserve_result(reply, status in ("replay", "reopened"), op.holds)
        if status in ("ok", "reopened"):
            self._recent[result.reservation_id] = (op.holds, op.tenant_id, op.workflow_id,
                                                   op.agent_id)
            if len(self._recent) > _RECENT_RESERVATIONS:
                self._recent.popitem(last=False)
        return result

    async def get_reservation(self, reservation_id: str) -> ReservationRecord | None:
        row = await self.client.hgetall(self._key(f"res:{reservation_id}"))
        if not row:
            return None
        r = {_s(k): _s(v) for k, v in row.items()}
        return ReservationRecord(reservation_id, r["request_id"], r["state"],
                                 holds_from_json(r["holds"]), int(r["micros"]),
                                 int(r["tokens"]), int(r["expire_time_us"]), r["tenant_id"],
                                 r["workflow_id"], r["agent_id"])

    async def _as_defined_now(self, holds: tuple[Hold, ...], refresh: bool
                              ) -> tuple[int, tuple[Hold, ...]]:
        """(config version, ``holds`` with their budgets' limits, mode and
        thresholds as of that version; budgets deleted since left out)."""
        ids = [h.budget_id for h in holds]
        if refresh or self._defs_version is None or any(i not in self._defs for i in ids):
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self._key("config:version"))
            for i in ids:
                pipe.hget(self._key(f"budget:{i}"), "json")
            version, *texts = await pipe.execute()
            version = int(version or 0)
            if version != self._defs_version:
                self._defs, self._defs_version = {}, version
            self._defs.update((i, None if t is None else budget_from_json(t))
                              for i, t in zip(ids, texts, strict=True))
        now = []
        for h in holds:
            b = self._defs[h.budget_id]
            if b is not None:
                now.append(dataclasses.replace(h, limit_micros=b.limit_micros,
                                               limit_tokens=b.limit_tokens, mode=b.mode,
                                               thresholds=b.thresholds,
                                               shown_start_us=shown_start(b)))
        return self._defs_version, tuple(now)

    async def settle(self, op: SettleOp) -> SettleResult:
        refresh = False
        for _ in range(5):
            holds, expected, c = op.holds, "1", op.call
            # The version the call was priced (and a track's holds computed)
            # under; -1: a commit charges under the version it reads below.
            version = op.config_version
            if op.reservation_id:
                # A reservation's holds and ids change only when a retried
                # Reserve holds it again: known here if it was made through
                # this store, else read here; the script checks the
                # reservation is (still) there and holds nothing else.
                # The call is recorded with the reservation's ids.
                known = self._recent.pop(op.reservation_id, None)
                if known is not None:
                    holds = known[0]
                    c = dataclasses.replace(c, tenant_id=known[1], workflow_id=known[2],
                                            agent_id=known[3])
                else:
                    row = await self.client.hmget(self._key(f"res:{op.reservation_id}"),
                                                  "holds", "tenant_id", "workflow_id",
                                                  "agent_id")
                    if row[0] is not None:
                        holds = holds_from_json(_s(row[0]))
                        c = dataclasses.replace(c, tenant_id=_s(row[1]),
                                                workflow_id=_s(row[2]), agent_id=_s(row[3]))
                    else:
                        holds, expected = (), "0"
                if holds:
                    seen = op.config_version
                    defs_version, holds = await self._as_defined_now(
                        holds, refresh or seen not in (-1, self._defs_version))
                    if seen == -1:
                        version = defs_version
                    # else: if the definitions read are of another version,
                    # the script answers stale (or replays).
            # The script adds the budgets it charged (ids and keys).
            head = json.dumps({"cost_micros": c.cost_micros,
                               "call_context": [c.tenant_id, c.workflow_id, c.agent_id],
                               "unpriced": op.unpriced})
            reply = await self._run(
                self._settle, op.request_id, op.fingerprint, op.reservation_id, expected,
                _num(c.cost_micros), _num(op.tokens), _num(c.time_us),
                json.dumps(dataclasses.asdict(c)), head[:-1] + ', ',
                str(len(holds)), str(int(version)), _num(op.arrived_us),
                *self._settle_holds(holds, op))
            status = _s(reply[0])
            if status == "conflict":
                raise IdempotencyConflict(op.request_id)
            if status == "stale":
                if not op.reservation_id or op.config_version != -1:
                    raise StaleConfig()
                refresh = True  # budgets changed: read them again
                continue
            if status == "notfound":
                raise ReservationNotFound(op.reservation_id)
            if status == "settled":
                raise ReservationSettled(op.reservation_id)
            if status != "retry":
                return _settle_result(reply[1], status == "replay", reply[2])
        # Budgets kept changing under the commit: the service retries (or
        # answers ABORTED), as for any stale configuration.
        raise StaleConfig()

    @staticmethod
    def _settle_holds(holds: tuple[Hold, ...], op: SettleOp) -> list[str]:
        out: list[str] = []
        for h in holds:
            frag = json.dumps({"budget_id": h.budget_id, "limit_micros": h.limit_micros,
                               "limit_tokens": h.limit_tokens,
                               "period_start_us": h.period_start_us,
                               "request_id": op.request_id})
            out += [_ctr(h.budget_id, h.period_start_us), _fired(h.budget_id, h.period_start_us),
                    _num(h.limit_micros), _num(h.limit_tokens), frag[1:-1],
                    json.dumps(h.budget_id), json.dumps([h.budget_id, h.period_start_us]),
                    str(len(h.thresholds))]
            for threshold in h.thresholds:
                out += [str(int(threshold)), json.dumps(alert_id(h, threshold))]
        return out

    async def release(self, reservation_id: str, now_us: int, *,
                      once: Once | None = None) -> ReleaseResult:
        reply = await self._run(self._release, *_once_args(once), reservation_id,
                                _num(now_us))
        seen = _replayed(reply, once)
        if seen is not None:
            return replayed_release(seen)
        status = _s(reply[0])
        if status == "notfound":
            return ReleaseResult(False, found=False)
        if status == "no":
            return ReleaseResult(False)
        return ReleaseResult(True, int(reply[1]), int(reply[2]))

    async def expire(self, now_us: int, limit: int = 1000) -> int:
        return int(await self._run(self._expire, _num(now_us), str(int(limit))))

    async def prune(self, now_us: int, history_before_us: int, limit: int = 10_000) -> int:
        pruned = int(await self._run(self._prune, _num(history_before_us), str(int(limit))))
        return pruned + await self._expire_legacy_keys(now_us, limit)

    async def _expire_legacy_keys(self, now_us: int, limit: int) -> int:
        """Give answers and closed reservations written by versions that did
        not expire them their expiry: a few SCAN steps, at most about
        ``limit`` keys looked at, resumed by the next call (on any replica)
        until the pass is over. Returns how many keys got an expiry."""
        given = 0
        for _ in range(max(1, limit // _LEGACY_SCAN_COUNT)):
            if self._legacy_done:
                break
            n, done = await self._run(self._expire_legacy, _num(now_us),
                                      str(_LEGACY_SCAN_COUNT))
            given += int(n)
            self._legacy_done = bool(done)
        return given

    async def counters(self, keys):
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for budget_id, period in keys:
            pipe.hmget(self._key(_ctr(budget_id, period)), "spent_micros", "spent_tokens",
                       "reserved_micros", "reserved_tokens")
            pipe.smembers(self._key(_fired(budget_id, period)))
        replies = await pipe.execute()
        out = []
        for i, (budget_id, period) in enumerate(keys):
            values, fired = replies[2 * i], replies[2 * i + 1]
            out.append(Counter(budget_id, period, *(int(v) if v is not None else 0
                                                    for v in values),
                               tuple(sorted(int(t) for t in fired))))
        return out

    async def calls(self, start_us: int, end_us: int) -> list[CallRecord]:
        # Scores are doubles: beyond 2**53 microseconds from 1970 (about 285
        # years) neighbouring microseconds share one. Both bounds are read
        # inclusive and the calls' exact times decide.
        members = await self.client.zrangebyscore(self._key("calls"), _num(start_us),
                                                  _num(end_us))
        calls = (CallRecord(**json.loads(m[20:])) for m in members)
        return [c for c in calls if start_us <= c.time_us < end_us]

    async def alerts_after(self, seq: int, limit: int = 1000) -> list[AlertRecord]:
        if limit == 0:
            return []
        members = await self.client.zrangebyscore(self._key("alerts"), f"({int(seq)}", "+inf",
                                                  0, limit)
        return [AlertRecord(**json.loads(m)) for m in members]

    async def last_alert_seq(self) -> int:
        value = await self.client.get(self._key("alerts:seq"))
        return int(value) if value is not None else 0

    async def close(self) -> None:
        await self.client.aclose()
