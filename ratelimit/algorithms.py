"""The counting algorithms, each defined once, in two forms that agree exactly.

The Python form (``apply_hits``) runs in the memory backend; the Lua form (``HITS_LUA``) runs inside Redis with
EVALSHA (backends/redis.py).  Both take the same inputs (``script_keys``/``script_args`` build them), do the same
integer arithmetic in the same order and return the same raw tuples ``(over, remaining, reset_ms, retry_after_ms)``.

Units and exactness.  Time is integer milliseconds (``to_ms``); a period P = ``limit.period_s * 1000`` ms.  Every
quantity is an integer and every division is an integer floor/ceil division, so Lua 5.1's doubles reproduce
Python's ints bit for bit while values stay below 2**53 (counts * P and (burst + cost) * P: e.g. a one-day period
allows counts up to 10**11).  Stored state never decides a result after it expires (expiry only frees memory), so
Redis expiring by its own clock and the memory backend by the request's ``now`` give the same answers.

fixed_window (envoyproxy/ratelimit's): windows aligned to the epoch, ws = now - now % P; state: count C under
``key:<ws in seconds>``.  over = C + cost > limit; remaining = max(0, limit - (C + cost)); reset = ws + P - now;
retry_after = reset (nothing frees up before the window ends).  A new key expires at ws + P + slack.

sliding_window (sliding window counter): counts Cp of the previous and Cc of the current window (two keys as above);
the estimate E = Cp * (P - e) / P + Cc, e = now - ws, is compared in units of 1/P (no rounding):
over = Cp * (P - e) + (Cc + cost) * P > limit * P; remaining = floor((limit * P - that) / P) when not over, else 0;
reset = when E reaches 0: ws + 2P - now if Cc + cost > 0, else ws + P - now if Cp > 0, else 0;
retry_after = the first ms at which a request of this cost fits, given the state after this request (the
previous window's weight decays during this window, then the current one's during the next).  Consumption adds to
the current window; a new key expires at ws + 2P + slack (it is the previous window of the next one).

token_bucket (GCRA): emission interval T = P / limit ms, capacity B = burst or limit.  Time is kept exactly in
ticks of 1/limit ms, so T = P ticks and the tolerance B * T = B * P ticks.  State: the theoretical arrival time TAT
as ``"<ms>:<ticks>"`` (TAT = ms + ticks / limit, 0 <= ticks < limit) under the bare key.  new_tat = max(TAT, now) +
cost * T; debt = new_tat - now (ticks); over = debt > B * P; remaining = floor((B * P - debt) / P) when not over,
else 0; reset = ceil(debt / limit) ms (the bucket is full again); retry_after = ceil((debt' + cost * P - B * P) /
limit) where debt' is the state after this request.  The key expires at the new TAT + slack.

A request's hits (``backends.base``): each outcome is computed against the state before the request (two hits on
one key both see that state), as if the hit were consumed; blocked = some non-shadow hit is over; a hit with
cost > 0 is consumed when ``count_blocked`` or not blocked.  retry_after (over hits only, else 0) uses the state
after consumption; a cost that can never fit (cost > limit, or > capacity) gets retry_after = reset.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

from ratelimit.backends.base import Hit, Outcome
from ratelimit.model import Algorithm

EXPIRY_SLACK_MS = 1000  # keys outlive their last use a little, so service clocks a bit ahead of Redis lose nothing

FIXED_WINDOW = 1  # algorithm codes in the script's ARGV
SLIDING_WINDOW = 2
TOKEN_BUCKET = 3
ALGORITHM_CODES: dict[Algorithm, int] = {
    Algorithm.FIXED_WINDOW: FIXED_WINDOW,
    Algorithm.SLIDING_WINDOW: SLIDING_WINDOW,
    Algorithm.TOKEN_BUCKET: TOKEN_BUCKET,
}

# ARGV[2]: what the script may consume.  One call per request decides alone (DECIDE).  When a request's hits span
# several Redis Cluster slots, a caller can first ask every slot with DRY_RUN (nothing consumed), then, if some
# non-shadow hit was over, call again with BLOCKED (only count_blocked hits consumed), otherwise with DECIDE.
MODE_DECIDE = 0
MODE_DRY_RUN = 1
MODE_BLOCKED = 2

ARGS_PER_HIT = 7  # algorithm, limit, period_ms, burst, cost, count_blocked, shadow

Raw = tuple[int, int, int, int]  # over (0/1), remaining, reset_ms, retry_after_ms: the script's reply per hit


def to_ms(now: float) -> int:
    """The request's time (seconds since the epoch) in the integer milliseconds both forms compute with."""
    return round(now * 1000)


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    return (a + b - 1) // b


def window_start_ms(now_ms: int, period_ms: int) -> int:
    return now_ms - now_ms % period_ms


def storage_keys(hit: Hit, now_ms: int) -> tuple[str, ...]:
    """The store keys one hit reads and writes, in the script's KEYS order.

    The window suffix goes after the key, so a ``{hash tag}`` in ``hit.key`` keeps all of them in its Cluster slot
    (keys.counter_key always puts one there; an untagged key's suffixed forms may land in other slots).
    """
    algorithm = hit.limit.algorithm
    if algorithm is Algorithm.TOKEN_BUCKET:
        return (hit.key,)
    period_ms = hit.limit.period_s * 1000
    ws = window_start_ms(now_ms, period_ms)
    if algorithm is Algorithm.SLIDING_WINDOW:
        return (f"{hit.key}:{ws // 1000}", f"{hit.key}:{(ws - period_ms) // 1000}")
    return (f"{hit.key}:{ws // 1000}",)


def script_keys(hits: Sequence[Hit], now_ms: int) -> list[str]:
    """KEYS for ``HITS_LUA``: every hit's ``storage_keys``, concatenated in hit order."""
    return [key for hit in hits for key in storage_keys(hit, now_ms)]


def counted_cost(hit: Hit) -> int:
    """The cost both forms count. A token bucket's cost above its capacity can never fit; it counts as capacity + 1,
    which answers the same (over, 0 remaining) but keeps a huge hits_addend from pushing the bucket's debt (and
    its key's expiry) years ahead, or past the 2^53 the Lua form computes exactly."""
    limit = hit.limit
    if limit.algorithm is Algorithm.TOKEN_BUCKET:
        capacity = limit.burst if limit.burst > 0 else limit.requests_per_unit
        return min(hit.cost, capacity + 1)
    return hit.cost


def script_args(hits: Sequence[Hit], now_ms: int, mode: int = MODE_DECIDE) -> list[int]:
    """ARGV for ``HITS_LUA``: now_ms, mode, then ``ARGS_PER_HIT`` integers per hit."""
    argv = [now_ms, mode]
    for hit in hits:
        limit = hit.limit
        argv += (
            ALGORITHM_CODES[limit.algorithm],
            limit.requests_per_unit,
            limit.period_s * 1000,
            limit.burst,
            counted_cost(hit),
            int(hit.count_blocked),
            int(hit.shadow),
        )
    return argv


def to_outcome(raw: Sequence[int]) -> Outcome:
    """One raw reply (from either form) as the backend interface's Outcome (seconds)."""
    over, remaining, reset_ms, retry_ms = raw
    return Outcome(over=bool(over), remaining=int(remaining), reset_s=reset_ms / 1000, retry_after_s=retry_ms / 1000)


# --- the Python form ------------------------------------------------------------------------------------------------
# Each function below has a Lua twin of the same name in HITS_LUA; change both or neither.


def fw_eval(count: int, limit: int, period_ms: int, cost: int, now_ms: int) -> tuple[bool, int, int]:
    after = count + cost
    over = after > limit
    remaining = 0 if over else limit - after
    reset = window_start_ms(now_ms, period_ms) + period_ms - now_ms
    return over, remaining, reset


def fw_ttl_ms(now_ms: int, period_ms: int) -> int:
    """The expiry of a fixed-window key created at ``now_ms``: its window's end plus the slack."""
    return window_start_ms(now_ms, period_ms) + period_ms + EXPIRY_SLACK_MS - now_ms


def fw_outcome(count: int, limit: int, period_ms: int, cost: int, now_ms: int) -> Outcome:
    """A fixed-window hit's outcome from the count before it, when its consumption depends on no other hit
    (count_blocked, or cost 0): retry_after = reset when over, as nothing frees up before the window ends.
    ``to_outcome`` of what the script answers for it. For the Redis backend's MULTI fast path (backends/redis.py);
    the script has no such path, so no Lua twin."""
    over, remaining, reset = fw_eval(count, limit, period_ms, cost, now_ms)
    reset_s = reset / 1000
    return Outcome(over, remaining, reset_s, reset_s if over else 0.0)


def sw_eval(prev: int, cur: int, limit: int, period_ms: int, cost: int, now_ms: int) -> tuple[bool, int, int]:
    ws = window_start_ms(now_ms, period_ms)
    weighted = prev * (period_ms - (now_ms - ws)) + (cur + cost) * period_ms  # the estimate times P
    over = weighted > limit * period_ms
    remaining = 0 if over else (limit * period_ms - weighted) // period_ms
    if cur + cost > 0:
        reset = ws + 2 * period_ms - now_ms
    elif prev > 0:
        reset = ws + period_ms - now_ms
    else:
        reset = 0
    return over, remaining, reset


def sw_retry(prev: int, cur: int, limit: int, period_ms: int, cost: int, now_ms: int) -> int:
    """ms until a request of ``cost`` fits, ``cur`` being the current window's count after this request."""
    ws = window_start_ms(now_ms, period_ms)
    left = period_ms - (now_ms - ws)  # ms left in this window
    need = prev * left + (cur + cost) * period_ms - limit * period_ms
    if need <= 0:
        return 0
    if prev > 0 and need <= prev * left:  # the previous window's weight decays enough within this window
        return ceil_div(need, prev)
    # next window: cur becomes the decaying previous count (cur + cost > limit >= cost here, so cur > 0)
    return left + ceil_div((cur + cost - limit) * period_ms, cur)


def tb_advance(tat_ms: int, tat_ticks: int, limit: int, period_ms: int, cost: int, now_ms: int) -> tuple[int, int]:
    """max(TAT, now) + cost * T, as (ms, ticks of 1/limit ms)."""
    if tat_ms < now_ms:
        tat_ms, tat_ticks = now_ms, 0
    total = tat_ticks + cost * period_ms
    return tat_ms + total // limit, total % limit


def tb_debt(tat_ms: int, tat_ticks: int, limit: int, now_ms: int) -> int:
    """TAT - now in ticks, for a TAT from tb_advance (never before now)."""
    return (tat_ms - now_ms) * limit + tat_ticks


def tb_eval(debt: int, capacity: int, limit: int, period_ms: int) -> tuple[bool, int, int]:
    over = debt > capacity * period_ms
    remaining = 0 if over else (capacity * period_ms - debt) // period_ms
    return over, remaining, ceil_div(debt, limit)


def tb_retry(debt: int, capacity: int, limit: int, period_ms: int, cost: int) -> int:
    """ms until a request of ``cost`` fits, ``debt`` being the state after this request."""
    need = debt + cost * period_ms - capacity * period_ms
    return ceil_div(need, limit) if need > 0 else 0


class Cell:
    """One stored value of the memory backend: a count, or a TAT (value = ms, ticks); absent once expired."""

    __slots__ = ("expire_at", "ticks", "value")

    def __init__(self, value: int, ticks: int, expire_at: int) -> None:
        self.value = value
        self.ticks = ticks
        self.expire_at = expire_at  # ms, on the clock of the ``now`` passed in


def _get(states: MutableMapping[str, Cell], key: str, now_ms: int) -> Cell | None:
    cell = states.get(key)
    if cell is not None and cell.expire_at <= now_ms:
        del states[key]  # lazy expiry, as a Redis GET would find nothing
        return None
    return cell


def _incr(states: MutableMapping[str, Cell], key: str, by: int, ttl_ms: int, now_ms: int) -> None:
    """INCRBY, and PEXPIRE only when that created the key."""
    cell = _get(states, key, now_ms)
    if cell is None:
        states[key] = Cell(by, 0, now_ms + ttl_ms)
    else:
        cell.value += by


@dataclass(slots=True)
class _Eval:
    """One hit between the two phases: what was read and what the answer is if it is consumed."""

    keys: tuple[str, ...]
    alg: int
    limit: int
    period: int
    capacity: int
    cost: int
    count_blocked: bool
    shadow: bool
    state: int = 0  # fixed/sliding: the current window's count; token bucket: TAT ms
    ticks: int = 0  # token bucket: TAT ticks
    prev: int = 0  # sliding: the previous window's count
    over: bool = False
    remaining: int = 0
    reset: int = 0


def apply_hits(
    states: MutableMapping[str, Cell], hits: Sequence[Hit], now_ms: int, mode: int = MODE_DECIDE
) -> list[Raw]:
    """The Python form of ``HITS_LUA``: one request's hits against ``states`` (key -> Cell), atomically."""
    evals: list[_Eval] = []
    blocked = mode == MODE_BLOCKED
    for hit in hits:
        lim = hit.limit
        ev = _Eval(
            keys=storage_keys(hit, now_ms),
            alg=ALGORITHM_CODES[lim.algorithm],
            limit=lim.requests_per_unit,
            period=lim.period_s * 1000,
            capacity=lim.burst if lim.burst > 0 else lim.requests_per_unit,
            cost=counted_cost(hit),
            count_blocked=hit.count_blocked,
            shadow=hit.shadow,
        )
        cell = _get(states, ev.keys[0], now_ms)
        if ev.alg == FIXED_WINDOW:
            ev.state = 0 if cell is None else cell.value
            ev.over, ev.remaining, ev.reset = fw_eval(ev.state, ev.limit, ev.period, ev.cost, now_ms)
        elif ev.alg == SLIDING_WINDOW:
            ev.state = 0 if cell is None else cell.value
            prev_cell = _get(states, ev.keys[1], now_ms)
            ev.prev = 0 if prev_cell is None else prev_cell.value
            ev.over, ev.remaining, ev.reset = sw_eval(ev.prev, ev.state, ev.limit, ev.period, ev.cost, now_ms)
        else:
            if cell is not None:
                ev.state, ev.ticks = cell.value, cell.ticks
            ms, ticks = tb_advance(ev.state, ev.ticks, ev.limit, ev.period, ev.cost, now_ms)
            debt = tb_debt(ms, ticks, ev.limit, now_ms)
            ev.over, ev.remaining, ev.reset = tb_eval(debt, ev.capacity, ev.limit, ev.period)
        if ev.over and not ev.shadow:
            blocked = True
        evals.append(ev)
    return [_finish(states, ev, blocked, mode, now_ms) for ev in evals]


def _finish(states: MutableMapping[str, Cell], ev: _Eval, blocked: bool, mode: int, now_ms: int) -> Raw:
    """Second phase for one hit: consume it if the request's outcome says so, then its retry_after."""
    consumed = ev.cost > 0 and mode != MODE_DRY_RUN and (ev.count_blocked or not blocked)
    spent = ev.cost if consumed else 0
    key = ev.keys[0]
    if ev.alg == FIXED_WINDOW:
        if consumed:
            _incr(states, key, ev.cost, fw_ttl_ms(now_ms, ev.period), now_ms)
        retry = ev.reset
    elif ev.alg == SLIDING_WINDOW:
        if consumed:
            ttl = window_start_ms(now_ms, ev.period) + 2 * ev.period + EXPIRY_SLACK_MS - now_ms
            _incr(states, key, ev.cost, ttl, now_ms)
        if ev.cost > ev.limit:
            retry = ev.reset
        else:
            retry = sw_retry(ev.prev, ev.state + spent, ev.limit, ev.period, ev.cost, now_ms)
    else:
        if consumed:  # re-read: an earlier hit of this request may have moved the same TAT
            cell = _get(states, key, now_ms)
            ms, ticks = (0, 0) if cell is None else (cell.value, cell.ticks)
            ms, ticks = tb_advance(ms, ticks, ev.limit, ev.period, ev.cost, now_ms)
            ttl = ceil_div(tb_debt(ms, ticks, ev.limit, now_ms), ev.limit) + EXPIRY_SLACK_MS
            states[key] = Cell(ms, ticks, now_ms + ttl)
        ms, ticks = tb_advance(ev.state, ev.ticks, ev.limit, ev.period, spent, now_ms)
        if ev.cost > ev.capacity:
            retry = ev.reset
        else:
            retry = tb_retry(tb_debt(ms, ticks, ev.limit, now_ms), ev.capacity, ev.limit, ev.period, ev.cost)
    return (int(ev.over), ev.remaining, ev.reset, retry if ev.over else 0)


# --- the Lua form -----------------------------------------------------------------------------------------------
# KEYS: script_keys(hits, now_ms).  ARGV: script_args(hits, now_ms, mode).  Reply: one {over, remaining, reset_ms,
# retry_after_ms} per hit.  Touches only KEYS; expiry set when INCRBY creates a key (PEXPIRE) or with the TAT (SET
# PX); no clock or randomness: deterministic.  Lua 5.1 numbers are doubles: floor(a / b) is exact for the integers
# used here (a + b < 2**53).

HITS_LUA = """
local SLACK = __SLACK__
local function floor_div(a, b) return math.floor(a / b) end
local function ceil_div(a, b) return math.floor((a + b - 1) / b) end
local function window_start_ms(now, p) return now - now % p end

local function fw_eval(count, limit, p, cost, now)
  local after = count + cost
  local over = after > limit
  local remaining = 0
  if not over then remaining = limit - after end
  return over, remaining, window_start_ms(now, p) + p - now
end

local function fw_ttl_ms(now, p) return window_start_ms(now, p) + p + SLACK - now end

local function sw_eval(prev, cur, limit, p, cost, now)
  local ws = window_start_ms(now, p)
  local weighted = prev * (p - (now - ws)) + (cur + cost) * p
  local over = weighted > limit * p
  local remaining = 0
  if not over then remaining = floor_div(limit * p - weighted, p) end
  local reset = 0
  if cur + cost > 0 then reset = ws + 2 * p - now elseif prev > 0 then reset = ws + p - now end
  return over, remaining, reset
end

local function sw_retry(prev, cur, limit, p, cost, now)
  local ws = window_start_ms(now, p)
  local left = p - (now - ws)
  local need = prev * left + (cur + cost) * p - limit * p
  if need <= 0 then return 0 end
  if prev > 0 and need <= prev * left then return ceil_div(need, prev) end
  return left + ceil_div((cur + cost - limit) * p, cur)
end

local function tb_advance(tat_ms, tat_ticks, limit, p, cost, now)
  if tat_ms < now then tat_ms = now; tat_ticks = 0 end
  local total = tat_ticks + cost * p
  local q = floor_div(total, limit)
  return tat_ms + q, total - q * limit
end

local function tb_debt(tat_ms, tat_ticks, limit, now)
  return (tat_ms - now) * limit + tat_ticks
end

local function tb_eval(debt, capacity, limit, p)
  local over = debt > capacity * p
  local remaining = 0
  if not over then remaining = floor_div(capacity * p - debt, p) end
  return over, remaining, ceil_div(debt, limit)
end

local function tb_retry(debt, capacity, limit, p, cost)
  local need = debt + cost * p - capacity * p
  if need > 0 then return ceil_div(need, limit) end
  return 0
end

local function tb_get(key)
  local v = redis.call('GET', key)
  if not v then return 0, 0 end
  local sep = string.find(v, ':', 1, true)
  return tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
end

local function incr(key, by, ttl)
  if redis.call('INCRBY', key, by) == by then redis.call('PEXPIRE', key, ttl) end
end

local now = tonumber(ARGV[1])
local mode = tonumber(ARGV[2])
local n = (#ARGV - 2) / __ARGS__
if n ~= math.floor(n) then return redis.error_reply('meshgate: bad ARGV count') end
local evals = {}
local blocked = mode == 2
local k = 1
for i = 1, n do
  local a = 2 + (i - 1) * __ARGS__
  local ev = {alg = tonumber(ARGV[a + 1]), limit = tonumber(ARGV[a + 2]), period = tonumber(ARGV[a + 3]),
              burst = tonumber(ARGV[a + 4]), cost = tonumber(ARGV[a + 5]), count_blocked = ARGV[a + 6] == '1',
              shadow = ARGV[a + 7] == '1', key = k, state = 0, ticks = 0, prev = 0}
  if ev.alg == 1 then
    ev.state = tonumber(redis.call('GET', KEYS[k])) or 0
    ev.over, ev.remaining, ev.reset = fw_eval(ev.state, ev.limit, ev.period, ev.cost, now)
    k = k + 1
  elseif ev.alg == 2 then
    ev.state = tonumber(redis.call('GET', KEYS[k])) or 0
    ev.prev = tonumber(redis.call('GET', KEYS[k + 1])) or 0
    ev.over, ev.remaining, ev.reset = sw_eval(ev.prev, ev.state, ev.limit, ev.period, ev.cost, now)
    k = k + 2
  elseif ev.alg == 3 then
    ev.capacity = ev.limit
    if ev.burst > 0 then ev.capacity = ev.burst end
    ev.state, ev.ticks = tb_get(KEYS[k])
    local ms, ticks = tb_advance(ev.state, ev.ticks, ev.limit, ev.period, ev.cost, now)
    ev.over, ev.remaining, ev.reset = tb_eval(tb_debt(ms, ticks, ev.limit, now), ev.capacity, ev.limit, ev.period)
    k = k + 1
  else
    return redis.error_reply('meshgate: unknown algorithm')
  end
  if ev.over and not ev.shadow then blocked = true end
  evals[i] = ev
end
if k - 1 ~= #KEYS then return redis.error_reply('meshgate: KEYS do not match the hits') end

local out = {}
for i = 1, n do
  local ev = evals[i]
  local key = KEYS[ev.key]
  local consumed = ev.cost > 0 and mode ~= 1 and (ev.count_blocked or not blocked)
  local spent = 0
  if consumed then spent = ev.cost end
  local retry
  if ev.alg == 1 then
    if consumed then incr(key, ev.cost, fw_ttl_ms(now, ev.period)) end
    retry = ev.reset
  elseif ev.alg == 2 then
    if consumed then incr(key, ev.cost, window_start_ms(now, ev.period) + 2 * ev.period + SLACK - now) end
    if ev.cost > ev.limit then
      retry = ev.reset
    else
      retry = sw_retry(ev.prev, ev.state + spent, ev.limit, ev.period, ev.cost, now)
    end
  else
    if consumed then
      local ms, ticks = tb_get(key)
      ms, ticks = tb_advance(ms, ticks, ev.limit, ev.period, ev.cost, now)
      local ttl = ceil_div(tb_debt(ms, ticks, ev.limit, now), ev.limit) + SLACK
      redis.call('SET', key, string.format('%d:%d', ms, ticks), 'PX', ttl)
    end
    local ms, ticks = tb_advance(ev.state, ev.ticks, ev.limit, ev.period, spent, now)
    if ev.cost > ev.capacity then
      retry = ev.reset
    else
      retry = tb_retry(tb_debt(ms, ticks, ev.limit, now), ev.capacity, ev.limit, ev.period, ev.cost)
    end
  end
  if not ev.over then retry = 0 end
  local over = 0
  if ev.over then over = 1 end
  out[i] = {over, ev.remaining, ev.reset, retry}
end
return out
""".replace("__SLACK__", str(EXPIRY_SLACK_MS)).replace("__ARGS__", str(ARGS_PER_HIT))
