"""Spend and budget reservations in Redis, shared by every process with the same prefix."""

from __future__ import annotations

import collections
import datetime as _dt
import functools
import threading
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from ... import forksafe
from ...pricing import (
    OTHER_MODELS,
    InMemorySpendStore,
    Limit,
    Refusal,
    Reservation,
    SpendRow,
    SpendStore,
)
from .link import (
    RedisLink,
    UnexpectedAnswer,
    Unreachable,
    answer_int,
    answer_list,
    answer_text,
    log,
)

__all__ = ["RECORD_LUA", "RESERVE_LUA", "RedisSpendStore"]

_NANO = Decimal(10) ** 9  # money is kept in Redis as integer nano-USD: exact, and HINCRBY-able
_MAX_PENDING = 10_000  # spend records kept for Redis while it is away (oldest dropped first)
_REPLAY_BATCH = 200

# Field names come from callers' model names, so both scripts keep them bounded: a model's
# own totals exist only where a reservation under its own cap made them
# ('model:M:reserved'), and a day names the first models that spent (as many as the
# in-memory store does); the others share one row.

RESERVE_LUA = """
-- Hold a call's estimated cost unless it would pass a cap (holysheep_lb).
-- KEYS: the day's hash, the month's hash, the index of days (a sorted set)
-- ARGV: model, amount (nano-USD), day number, day, ttl_s, number of caps, then for
--       each cap: period ('day' or 'month'), scope ('' for the whole client, or a model),
--       cap (nano-USD)
-- Returns {1} when held, {0, index of the cap, spent, reserved} when refused.
local model, amount = ARGV[1], tonumber(ARGV[2])
local capped = false
for i = 1, tonumber(ARGV[6]) do
  local base = 6 + (i - 1) * 3
  local key = KEYS[1]
  if ARGV[base + 1] == 'month' then key = KEYS[2] end
  local who = 'client'
  if ARGV[base + 2] ~= '' then who = 'model:' .. ARGV[base + 2] end
  if ARGV[base + 2] == model then capped = true end
  local spent = redis.call('HGET', key, who .. ':spent') or '0'
  local reserved = redis.call('HGET', key, who .. ':reserved') or '0'
  if tonumber(spent) + tonumber(reserved) + amount > tonumber(ARGV[base + 3]) then
    return {0, i, spent, reserved}
  end
end
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  redis.call('HINCRBY', key, 'client:reserved', ARGV[2])
  if capped then redis.call('HINCRBY', key, 'model:' .. model .. ':reserved', ARGV[2]) end
  redis.call('EXPIRE', key, ARGV[5])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {1}
"""

RECORD_LUA = """
-- Record what a call did: release its reservation, add its cost and tokens (holysheep_lb).
-- KEYS: the day's hash, the month's hash, the index of days (a sorted set)
-- ARGV: model, release (nano-USD), cost (nano-USD), requests, cached requests,
--       input tokens, output tokens, day number, day, ttl_s, oldest day number kept,
--       how many models a day names, the name of the others' row,
--       then (optional) unconfirmed attempts and their part of the cost (nano-USD),
--       then (optional) prompt-cache details: cached input tokens, cache-write tokens,
--       what the cache saved (nano-USD, may be negative), answers with unreadable usage
local day, month = KEYS[1], KEYS[2]
local own = 'model:' .. ARGV[1]
local release, cost = ARGV[2], ARGV[3]
local details = ARGV[16] ~= nil and (ARGV[16] ~= '0' or ARGV[17] ~= '0' or ARGV[18] ~= '0' or ARGV[19] ~= '0')
local function add(key, who)
  if cost ~= '0' then redis.call('HINCRBY', key, who .. ':spent', cost) end
  -- below zero only if the keys were lost (a Redis restart) while the call was in flight
  if release ~= '0' and redis.call('HINCRBY', key, who .. ':reserved', '-' .. release) < 0 then
    redis.call('HSET', key, who .. ':reserved', 0)
  end
end
add(day, 'client')
add(month, 'client')
if redis.call('HEXISTS', month, own .. ':reserved') == 1 then add(month, own) end
local capped = redis.call('HEXISTS', day, own .. ':reserved') == 1
local row = own
if (ARGV[4] ~= '0' or ARGV[5] ~= '0' or details) and redis.call('HEXISTS', day, own .. ':requests') == 0
    and redis.call('HEXISTS', day, own .. ':cached') == 0 then
  if tonumber(redis.call('HGET', day, 'named_models') or '0') < tonumber(ARGV[12]) then
    redis.call('HINCRBY', day, 'named_models', 1)
  elseif not capped then
    row = 'model:' .. ARGV[13]
  end
end
if capped then
  add(day, own)  -- a capped model always has its own row: its row's cost is its total
elseif cost ~= '0' then
  redis.call('HINCRBY', day, row .. ':spent', cost)
end
for i, field in ipairs({'requests', 'cached', 'input', 'output'}) do
  if ARGV[3 + i] ~= '0' then redis.call('HINCRBY', day, row .. ':' .. field, ARGV[3 + i]) end
end
if ARGV[14] and ARGV[14] ~= '0' then
  redis.call('HINCRBY', day, row .. ':unconfirmed', ARGV[14])
  redis.call('HINCRBY', day, row .. ':unconfirmed_spent', ARGV[15])
end
if details then
  for i, field in ipairs({'cached_input', 'cache_write', 'cache_saved', 'unreadable'}) do
    if ARGV[15 + i] ~= '0' then redis.call('HINCRBY', day, row .. ':' .. field, ARGV[15 + i]) end
  end
end
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[11])
for _, key in ipairs(KEYS) do
  redis.call('EXPIRE', key, ARGV[10])  -- after the writes: EXPIRE on a missing key does nothing
end
return 1
"""

# hash field suffix -> SpendRow attribute
_ROW_FIELDS = {"requests": "requests", "cached": "cached_requests", "input": "input_tokens",
               "output": "output_tokens", "spent": "cost_usd", "unconfirmed": "unconfirmed_calls",
               "unconfirmed_spent": "unconfirmed_usd", "cached_input": "cached_input_tokens",
               "cache_write": "cache_write_tokens", "cache_saved": "cache_saved_usd",
               "unreadable": "unreadable_usage"}
_MONEY_FIELDS = ("cost_usd", "unconfirmed_usd", "cache_saved_usd")
_SIGNED_FIELDS = ("cache_saved_usd",)  # writing to a prompt cache can cost more than it saves


def _nano(usd: Decimal, rounding: str) -> int:
    return int((usd * _NANO).to_integral_value(rounding=rounding))


def _usd(raw: Any, what: str, *, signed: bool = False) -> Decimal:
    return Decimal(answer_int(raw, what, minimum=None if signed else 0)) / _NANO


def _day_number(day: str) -> int:
    return _dt.date.fromisoformat(day).toordinal()


def _day(raw: Any, what: str) -> str:
    day = answer_text(raw, what)
    try:
        _dt.date.fromisoformat(day)
    except ValueError:
        raise UnexpectedAnswer(what, raw) from None
    return day


def _check_done(reply: Any, what: str) -> None:
    if answer_int(reply, what) != 1:
        raise UnexpectedAnswer(what, reply)


class RedisSpendStore(SpendStore):
    """Spend and in-flight reservations in Redis, shared by every process with the same
    prefix: per UTC day and month, kept ``retain_days`` days. Thread-safe.

    Money is stored as integer nano-USD (reservations rounded up, costs to nearest).
    Model names come from callers, so the hashes stay bounded like the in-memory store:
    a day names its first ``max_models_per_day`` (256) models and counts the others in
    one :data:`~holysheep_lb.pricing.OTHER_MODELS` row; per-model totals exist only for
    models with their own cap (such a model always keeps its own row). While Redis is
    unreachable the budgets are held in this process
    (:class:`~holysheep_lb.pricing.InMemorySpendStore`, which also mirrors this
    process's own spend all along) and what was spent is written to Redis once it is
    back (up to 10,000 records; older ones are dropped with a warning). Fail-closed:
    ``try_reserve`` raises :class:`~holysheep_lb.errors.SharedStateUnavailableError`;
    ``settle``, ``cancel``, ``record_cache_hit`` and ``record_usage_details`` never raise.
    """

    def __init__(self, link: RedisLink, *, prefix: str, retain_days: int, reserve_script: Any,
                 record_script: Any) -> None:
        self._local = InMemorySpendStore(retain_days=retain_days)  # validates retain_days
        self.retain_days = retain_days
        self._ttl_s = str(retain_days * 86400)
        self._prefix = prefix
        self._days_key = f"{prefix}spend:days"
        self._link = link
        self._reserve = reserve_script
        self._record_script = record_script
        self._held_lock = threading.Lock()
        self._held_here: Dict[int, Reservation] = {}  # reservations held by the local store
        self._pending_lock = threading.Lock()
        self._pending: Deque[Tuple[str, Tuple[str, ...]]] = collections.deque()  # (day, record args)
        self._dropped = 0
        forksafe.register(self)

    def __repr__(self) -> str:
        return f"<RedisSpendStore {self._prefix}spend:*>"

    def _keys(self, day: str) -> Tuple[str, str, str]:
        return f"{self._prefix}spend:day:{day}", f"{self._prefix}spend:month:{day[:7]}", self._days_key

    # -- SpendStore -------------------------------------------------------------------

    def try_reserve(self, reservation: Reservation, limits: Sequence[Limit]) -> Optional[Refusal]:
        self._replay_pending()
        day = reservation.day
        args: List[str] = [reservation.model, str(_nano(reservation.amount_usd, ROUND_CEILING)),
                           str(_day_number(day)), day, self._ttl_s, str(len(limits))]
        for limit in limits:
            args += [limit.period, limit.model or "", str(_nano(limit.cap_usd, ROUND_FLOOR))]
        try:
            refused = self._link.call(lambda c: self._reserve_answer(
                self._reserve(keys=self._keys(day), args=args, client=c), limits))
        except Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable("budget", exc) from exc.__cause__
            refusal = self._local.try_reserve(reservation, limits)
            if refusal is None:
                with self._held_lock:
                    self._held_here[id(reservation)] = reservation
            return refusal
        return refused

    @staticmethod
    def _reserve_answer(reply: Any, limits: Sequence[Limit]) -> Optional[Refusal]:
        what = "the budget script"
        items = answer_list(reply, None, what)
        if len(items) == 1 and answer_int(items[0], what) == 1:
            return None
        if len(items) != 4 or answer_int(items[0], what) != 0:
            raise UnexpectedAnswer(what, reply)
        index = answer_int(items[1], what)
        if not 1 <= index <= len(limits):
            raise UnexpectedAnswer(what, reply)
        return Refusal(limits[index - 1], _usd(items[2], what), _usd(items[3], what))

    def settle(self, reservation: Reservation, *, input_tokens: int, output_tokens: int, cost_usd: Decimal) -> None:
        held_here = self._take_held_here(reservation)
        # the local mirror drops only a reservation it holds (one held in Redis was never added to it)
        mirror = self._local.settle if held_here else self._local.record_spend
        mirror(reservation, input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost_usd)
        self._record(reservation.model, reservation.day,
                     release=0 if held_here else _nano(reservation.amount_usd, ROUND_CEILING),
                     cost=_nano(cost_usd, ROUND_HALF_EVEN), requests=1,
                     input_tokens=input_tokens, output_tokens=output_tokens)

    def cancel(self, reservation: Reservation) -> None:
        if self._take_held_here(reservation):
            self._local.cancel(reservation)
            return
        release = _nano(reservation.amount_usd, ROUND_CEILING)
        if release:
            self._record(reservation.model, reservation.day, release=release)

    def record_cache_hit(self, model: str, day: str) -> None:
        self._local.record_cache_hit(model, day)
        self._record(model, day, cached=1)

    def record_unconfirmed(self, reservation: Reservation) -> None:
        self._local.record_unconfirmed(reservation)  # the reservation itself stays where it is held
        cost = _nano(reservation.amount_usd, ROUND_HALF_EVEN)
        self._record(reservation.model, reservation.day, cost=cost, input_tokens=reservation.input_tokens,
                     output_tokens=reservation.output_tokens, unconfirmed=1, unconfirmed_cost=cost)

    def record_usage_details(self, model: str, day: str, *, cached_input_tokens: int, cache_write_tokens: int,
                             cache_saved_usd: Decimal, unreadable_usage: int) -> None:
        self._local.record_usage_details(model, day, cached_input_tokens=cached_input_tokens,
                                         cache_write_tokens=cache_write_tokens, cache_saved_usd=cache_saved_usd,
                                         unreadable_usage=unreadable_usage)
        self._record(model, day, cached_input=cached_input_tokens, cache_write=cache_write_tokens,
                     cache_saved=_nano(cache_saved_usd, ROUND_HALF_EVEN), unreadable=unreadable_usage)

    def rows(self) -> List[SpendRow]:
        """Every process's spend, from Redis; this process's own while Redis is unreachable."""
        try:
            return self._link.call(self._remote_rows, budget_s=self._link.report_timeout_s)
        except Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable("spend report", exc) from exc.__cause__
            return self._local.rows()

    def reserved_usd(self) -> Decimal:
        """Every process's reservations in flight (today's and yesterday's)."""
        def read(client: Any) -> Decimal:
            total = Decimal(0)
            for raw_day in answer_list(client.zrange(self._days_key, -2, -1), None, "ZRANGE"):
                value = client.hget(self._keys(_day(raw_day, "ZRANGE"))[0], "client:reserved")
                if value is not None:
                    total += _usd(value, "HGET client:reserved")
            return total

        try:
            return self._link.call(read, budget_s=self._link.report_timeout_s)
        except Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable("spend report", exc) from exc.__cause__
            return self._local.reserved_usd()

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """The parent's reservations and unsent records are the parent's to finish."""
        self._local.reset_after_fork()
        self._held_lock = threading.Lock()
        self._held_here = {}
        self._pending_lock = threading.Lock()
        self._pending = collections.deque()
        self._dropped = 0

    def pending(self) -> int:
        """Spend records waiting for Redis to come back."""
        with self._pending_lock:
            return len(self._pending)

    # -- Redis ------------------------------------------------------------------------

    def _take_held_here(self, reservation: Reservation) -> bool:
        with self._held_lock:
            return self._held_here.pop(id(reservation), None) is reservation

    def _record(self, model: str, day: str, *, release: int = 0, cost: int = 0, requests: int = 0,
                cached: int = 0, input_tokens: int = 0, output_tokens: int = 0, unconfirmed: int = 0,
                unconfirmed_cost: int = 0, cached_input: int = 0, cache_write: int = 0, cache_saved: int = 0,
                unreadable: int = 0) -> None:
        number = _day_number(day)
        args = (model, str(release), str(cost), str(requests), str(cached), str(input_tokens), str(output_tokens),
                str(number), day, self._ttl_s, str(number - self.retain_days),
                str(self._local.max_models_per_day), OTHER_MODELS, str(unconfirmed), str(unconfirmed_cost),
                str(cached_input), str(cache_write), str(cache_saved), str(unreadable))
        self._replay_pending()
        try:
            self._link.call(lambda c: _check_done(self._record_script(keys=self._keys(day), args=args, client=c),
                                                  "the spend script"))
        except Unreachable:
            with self._pending_lock:
                if len(self._pending) >= _MAX_PENDING:
                    self._pending.popleft()
                    self._dropped += 1
                self._pending.append((day, args))

    def _replay_pending(self) -> None:
        """Write the records made while Redis was away, once it answers again."""
        if not self._pending or not self._link.reachable:
            return
        while True:
            with self._pending_lock:
                batch = [self._pending.popleft() for _ in range(min(_REPLAY_BATCH, len(self._pending)))]
                dropped, self._dropped = self._dropped, 0
            if dropped:
                log.warning("shared state: %d spend record(s) made while Redis was unreachable were dropped "
                            "(at most %d are kept); Redis's totals miss them", dropped, _MAX_PENDING)
            if not batch:
                return

            try:
                self._link.call(functools.partial(self._send_records, records=batch))
            except Unreachable:
                with self._pending_lock:
                    self._pending.extendleft(reversed(batch))
                return
            log.info("shared state: wrote %d spend record(s) made while Redis was unreachable", len(batch))

    def _send_records(self, client: Any, records: List[Tuple[str, Tuple[str, ...]]]) -> None:
        pipe = client.pipeline(transaction=False)
        for day, args in records:
            self._record_script(keys=self._keys(day), args=args, client=pipe)
        for reply in answer_list(pipe.execute(), len(records), "the spend script"):
            _check_done(reply, "the spend script")

    def _remote_rows(self, client: Any) -> List[SpendRow]:
        days = [_day(d, "ZRANGE") for d in answer_list(client.zrange(self._days_key, 0, -1), None, "ZRANGE")]
        pipe = client.pipeline(transaction=True)
        for day in days:
            pipe.hgetall(self._keys(day)[0])
        rows: List[SpendRow] = []
        for day, fields in zip(days, answer_list(pipe.execute(), len(days), "HGETALL")):
            if not isinstance(fields, dict):
                raise UnexpectedAnswer("HGETALL", fields)
            by_model: Dict[str, SpendRow] = {}
            for raw_field, raw_value in fields.items():
                field = answer_text(raw_field, "HGETALL")
                if not field.startswith("model:") or ":" not in field[len("model:"):]:
                    continue  # the client's totals, the count of named models
                model, what = field[len("model:"):].rsplit(":", 1)
                attr = _ROW_FIELDS.get(what)
                if attr is None:  # reserved
                    continue
                row = by_model.setdefault(model, SpendRow(day, model))
                if attr in _MONEY_FIELDS:
                    value: Any = _usd(raw_value, "HGETALL", signed=attr in _SIGNED_FIELDS)
                else:
                    value = answer_int(raw_value, "HGETALL", minimum=0)
                setattr(row, attr, value)
            rows.extend(r for r in by_model.values() if r.requests or r.cached_requests or r.cost_usd)
        return rows
