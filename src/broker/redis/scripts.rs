//! The engine's Lua scripts, each atomic in Redis, and the parsing of
//! their replies.

use redis::Value;

use crate::cursor::Epoch;

/// A Lua script for the engine, with `now` (Redis time, in milliseconds)
/// defined first: Redis's clock decides expiry, so nodes' clocks need not
/// agree.
macro_rules! script {
    ($($body:tt)+) => {
        concat!(
            "local t = redis.call('TIME')\n",
            "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
            $($body)+
        )
    };
}

/// A Lua function for the presence scripts: whether a presence hash has a
/// live entry of `user` other than `connection`'s.
macro_rules! others_of {
    () => {
        r#"
local function others_of(hash, connection, user)
  local entries = redis.call('HGETALL', hash)
  for i = 1, #entries, 2 do
    if entries[i] ~= connection then
      local expiry, member = string.match(entries[i + 1], '^(%d+) (.*)$')
      if expiry and tonumber(expiry) > now then
        local ok, decoded = pcall(cjson.decode, member)
        if ok and decoded.user == user then return true end
      end
    end
  end
  return false
end
"#
    };
}

/// Numbers, stores and fans out one publication on one channel.
///
/// KEYS: meta, stream, channel idempotency key (may be absent).
/// ARGV: new epoch, history size, ttl ms, meta ttl ms, idempotency window
/// ms, fingerprint, pub/sub channel, then the wire header's channel and
/// event, then data, then `PUBLISH` or `SPUBLISH`, then `1` when a `WAIT`
/// for replicas follows the script, then the publishing client's user as a
/// JSON string ('' for a publish from the API: wire version 1, else 2).
///
/// The stream entry holds the payload (`p`) alone, and the pub/sub message
/// is that payload byte for byte (`wire::encode`): what a node digests from
/// one is what the history script digests from the other (`wire::Digest`),
/// and nodes of every version read both.
///
/// Returns `{epoch, offset, 0}`, or `{epoch, offset, 1, fingerprint}` for a
/// key seen before.
pub(super) const PUBLISH_SCRIPT: &str = script!(
    r#"
local meta, stream = KEYS[1], KEYS[2]
local idem = KEYS[3]
if idem then
  local seen = redis.call('GET', idem)
  if seen then
    local fp, epoch, offset = string.match(seen, '^(%S+) (%S+) (%d+)$')
    if ARGV[12] == '1' then
      -- A write of ours, so the WAIT after this script also covers the
      -- publication this one repeats, whichever connection stored it:
      -- Redis counts a WAIT from the connection's last write (versions
      -- before 7.2 from its last command, which covers it either way).
      local left = redis.call('PTTL', idem)
      if left > 0 then redis.call('PEXPIRE', idem, left) end
    end
    return {epoch, tonumber(offset), 1, fp}
  end
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch)
end
local top = redis.call('HINCRBY', meta, 'top', 1)
local ttl = tonumber(ARGV[3])
local head = ARGV[8] .. '\n' .. epoch .. '\n' .. string.format('%d', top) .. '\n'
  .. string.format('%d', now) .. '\n' .. ARGV[9] .. '\n'
local payload
if ARGV[13] == '' then
  payload = '1\n' .. head .. ARGV[10]
else
  payload = '2\n' .. head .. ARGV[13] .. '\n' .. ARGV[10]
end
redis.call('XADD', stream, 'MAXLEN', ARGV[2], '*', 'p', payload)
redis.call('XTRIM', stream, 'MINID', string.format('%d', now - ttl))
redis.call('PEXPIRE', stream, ttl)
redis.call('PEXPIRE', meta, ARGV[4])
if idem then
  redis.call('SET', idem, ARGV[6] .. ' ' .. epoch .. ' ' .. string.format('%d', top), 'PX', ARGV[5])
end
redis.call(ARGV[11], ARGV[7], payload)
return {epoch, top, 0}
"#
);

/// Reads a channel's position and the publications a reader needs.
///
/// KEYS: meta, stream. ARGV: the reader's epoch ('' for none), its offset,
/// how many of the newest publications a reader without a position wants,
/// ttl ms, an epoch to move to if the reader's position is not in the
/// stream's history, the least ms between two such moves, and the SHA-1
/// hex of the payload of the publication at the reader's position
/// (`wire::Digest`; '' when the reader is not a node checking its own
/// position, or its position is not a publication).
///
/// Returns `{epoch, top, len, payloads newest first}`; epoch '' when the
/// channel does not exist.
///
/// A channel moves to a new epoch (its stream dropped: nothing in it can
/// be told apart from what a reader lost) when the store lost data a reader
/// saw: the reader is ahead of the stream, or the entry at the reader's
/// offset is not the publication it was handed (a promoted replica or a
/// restored snapshot lacked the tail and numbered new publications over
/// it). A digest comes only from a node's own record of what it handed to
/// its subscribers, so that evidence moves the epoch at once; a position
/// alone may be forged, so it moves the epoch at most once per interval.
/// Either move needs the reader's epoch to be the stream's, so one loss
/// moves the epoch once, whichever nodes notice it.
pub(super) const HISTORY_SCRIPT: &str = script!(
    r#"
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  return {'', 0, 0, {}}
end
local top = tonumber(redis.call('HGET', meta, 'top') or '0')
local since_epoch, since = ARGV[1], tonumber(ARGV[2])
local digest = ARGV[7]
local function move()
  epoch = ARGV[5]
  redis.call('HSET', meta, 'epoch', epoch, 'moved', string.format('%d', now))
  redis.call('DEL', stream)
  return {epoch, top, 0, {}}
end
if since_epoch == epoch and since > top then
  -- The reader saw offsets this stream no longer has: Redis lost data.
  local moved = tonumber(redis.call('HGET', meta, 'moved') or '0')
  if digest ~= '' or now - moved >= tonumber(ARGV[6]) then
    return move()
  end
  return {epoch, top, 0, {}}
end
redis.call('XTRIM', stream, 'MINID', string.format('%d', now - tonumber(ARGV[4])))
local len = redis.call('XLEN', stream)
-- An entry's payload: its field `p`, whatever other fields it has.
local function payload_of(entry)
  local fields = entry[2]
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'p' then return fields[i + 1] end
  end
  return ''
end
-- Newest first: the gap after the reader's offset, then the entry at it.
local read
if digest ~= '' and since_epoch == epoch and since > 0 and top - since + 1 <= len then
  -- Still the publication the reader handed on? The same read serves the
  -- gap below.
  read = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', top - since + 1)
  local there = read[top - since + 1]
  if there and redis.sha1hex(payload_of(there)) ~= digest then
    return move()
  end
end
local want
if since_epoch == '' then
  want = tonumber(ARGV[3])
elseif since == 0 or since_epoch == epoch then
  want = top - since
else
  want = 0
end
if want > len then want = len end
local out = {}
if want > 0 then
  read = read or redis.call('XREVRANGE', stream, '+', '-', 'COUNT', want)
  for i = 1, math.min(want, #read) do
    out[i] = payload_of(read[i])
  end
end
return {epoch, top, len, out}
"#
);

/// Lists and/or announces a member.
///
/// KEYS: the channel's presence hash. ARGV: connection, member JSON, ttl ms,
/// '1' to list, pub/sub channel, the event to publish ('' for none),
/// `PUBLISH` or `SPUBLISH`, the member's user ('' for none, or not asked).
/// A listed entry is `<expiry ms> <member JSON>`; Redis time decides
/// expiry, so nodes' clocks need not agree.
///
/// Returns 2 when the user was asked about and no other live entry has
/// it (its first connection here), else 1.
pub(super) const JOIN_SCRIPT: &str = script!(
    others_of!(),
    r#"
local first = 1
local user = ARGV[8] or ''
if user ~= '' and ARGV[4] == '1' and not others_of(KEYS[1], ARGV[1], user) then
  first = 2
end
if ARGV[4] == '1' then
  local ttl = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now + ttl) .. ' ' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if ARGV[6] ~= '' then
  redis.call(ARGV[7], ARGV[5], ARGV[6])
end
return first
"#
);

/// Unlists and/or announces a member. KEYS: presence hash. ARGV:
/// connection, pub/sub channel, event ('' for none), `PUBLISH` or
/// `SPUBLISH`, the member's user ('' for none, or not asked).
///
/// Returns 2 when the user was asked about, its entry was there, and no
/// other live entry has the user (its last connection left), else 1.
pub(super) const LEAVE_SCRIPT: &str = script!(
    others_of!(),
    r#"
local last = 1
local user = ARGV[5] or ''
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if user ~= '' and removed == 1 and not others_of(KEYS[1], ARGV[1], user) then
  last = 2
end
if ARGV[3] ~= '' then
  redis.call(ARGV[4], ARGV[2], ARGV[3])
end
return last
"#
);

/// Records whether a channel is heard anywhere: by the subscribers of its
/// pub/sub channel, which are the nodes with subscribers of their own (a
/// node that stops, or crashes, stops being one). KEYS: the channel's
/// occupancy key. ARGV: pub/sub channel, `NUMSUB` or `SHARDNUMSUB`.
///
/// Returns 1 when the channel just became occupied, 0 when it just became
/// vacant, -1 when nothing changed. Every node runs it after its own first
/// subscriber arrived or its last left, and it is atomic, so each change is
/// reported once, by one node, in the order the changes happened.
pub(super) const OCCUPANCY_SCRIPT: &str = script!(
    r#"
local heard = redis.call('PUBSUB', ARGV[2], ARGV[1])[2] > 0
if heard then
  if redis.call('SET', KEYS[1], '1', 'NX') then
    return 1
  end
elseif redis.call('DEL', KEYS[1]) == 1 then
  return 0
end
return -1
"#
);

/// The live members of a channel, dropping expired entries (a crashed
/// node's). KEYS: presence hash. Returns member JSON texts.
pub(super) const PRESENCE_SCRIPT: &str = script!(
    r#"
local entries = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #entries, 2 do
  local expiry, member = string.match(entries[i + 1], '^(%d+) (.*)$')
  if expiry and tonumber(expiry) > now then
    out[#out + 1] = member
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return out
"#
);

/// Takes (or refreshes) one of a user's connection places. KEYS: the
/// user's sorted set (connection → expiry ms). ARGV: connection, limit, ttl
/// ms. Returns 1 when taken, 0 when the user has `limit` live connections.
pub(super) const USER_SLOT_SCRIPT: &str = script!(
    r#"
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"#
);

pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

pub(super) fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

pub(super) fn parse_publish_reply(value: &Value) -> Option<(Epoch, u64, bool, Option<String>)> {
    let Value::Array(items) = value else {
        return None;
    };
    let epoch = Epoch::parse(&text(items.first()?)?).ok()?;
    let offset = number(items.get(1)?)?;
    let duplicate = number(items.get(2)?)? == 1;
    let seen = items.get(3).and_then(text);
    Some((epoch, offset, duplicate, seen))
}

/// A history script's reply: the epoch (`None`: no such channel), top,
/// stream length, payloads newest first.
pub(super) struct HistoryReply {
    pub epoch: Option<Epoch>,
    pub top: u64,
    pub len: u64,
    pub payloads: Vec<Vec<u8>>,
}

pub(super) fn parse_history_reply(value: &Value) -> Option<HistoryReply> {
    let Value::Array(items) = value else {
        return None;
    };
    let epoch = match text(items.first()?)?.as_str() {
        "" => None,
        epoch => Some(Epoch::parse(epoch).ok()?),
    };
    let top = number(items.get(1)?)?;
    let len = number(items.get(2)?)?;
    let Value::Array(entries) = items.get(3)? else {
        return None;
    };
    let payloads = entries
        .iter()
        .map(|entry| match entry {
            Value::BulkString(bytes) => Some(bytes.clone()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(HistoryReply {
        epoch,
        top,
        len,
        payloads,
    })
}
