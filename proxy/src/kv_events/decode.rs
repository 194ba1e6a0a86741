//! vLLM's KV-cache event payloads: msgpack bytes → [`EventBatch`].
//!
//! The schema is `vllm/distributed/kv_events.py` (vLLM 0.32): an
//! `EventBatch` is an `array_like` msgspec struct, `[ts, events, dp_rank]`
//! (the rank may be absent). Each event is a tagged msgspec struct. vLLM
//! 0.32 encodes events as maps with the tag under `"type"`
//! (`{"type": "BlockStored", "block_hashes": [...], ...}`); older releases
//! declared them `array_like`, `["BlockStored", block_hashes, ...]` in field
//! order; both are read. Fields with defaults may be absent (`omit_defaults`).
//!
//! Block hashes are `ExternalBlockHash = bytes | int`: 0.32 sends 64-bit
//! unsigned integers unless `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`, when
//! they are the raw (32-byte SHA-256) digests. Both are [`EngineHash`]es.
//!
//! Unknown event tags are skipped and counted in [`EventBatch::unknown`]; a
//! payload that is not an `EventBatch`, or a known event missing a field or
//! of the wrong type, is a [`DecodeError`].

use rmpv::Value;

/// A block hash as the engine reports it; opaque, only compared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EngineHash {
    /// An integer hash (vLLM's default). A negative msgpack integer, which
    /// vLLM does not send, keeps its two's-complement bits.
    Int(u64),
    /// A digest's bytes.
    Bytes(Box<[u8]>),
}

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Full blocks newly cached: `block_hashes[i]` holds
    /// `token_ids[i * block_size..(i + 1) * block_size]`, continuing the
    /// chain of `parent` (none: the blocks start a prompt).
    BlockStored {
        /// The blocks' hashes, in chain order.
        block_hashes: Vec<EngineHash>,
        /// The hash of the block before the first one, if any.
        parent: Option<EngineHash>,
        /// The blocks' tokens, `block_size` per block.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// Where the blocks live (`"GPU"`, `"CPU"`, …); `None`: unspecified.
        medium: Option<String>,
        /// Whether any block's hash covers more than its tokens (a LoRA
        /// adapter, multimodal inputs, a cache salt): `lora_id`,
        /// `lora_name` or an entry of `extra_keys` is set.
        keyed: bool,
    },
    /// Blocks evicted from the cache.
    BlockRemoved {
        /// The evicted blocks' hashes.
        block_hashes: Vec<EngineHash>,
        /// Where the blocks lived; `None`: unspecified.
        medium: Option<String>,
    },
    /// The whole cache was cleared (`AllBlocksCleared`).
    AllCleared,
}

/// One published batch of events.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// The engine's wall clock when the batch was made, in seconds since the epoch.
    pub timestamp: f64,
    /// The events in the engine's order.
    pub events: Vec<KvEvent>,
    /// The data-parallel rank that published it, when given.
    pub data_parallel_rank: Option<i64>,
    /// Events with a tag this decoder does not know, skipped.
    pub unknown: usize,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not one msgpack value.
    #[error("not msgpack: {0}")]
    Msgpack(#[from] rmpv::decode::Error),
    /// Bytes left after the batch.
    #[error("{0} bytes after the event batch")]
    Trailing(usize),
    /// msgpack, but not the shape of an `EventBatch`.
    #[error("malformed event batch: {0}")]
    Shape(String),
}

/// Decodes one `EventBatch` payload (the third frame of a message).
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut rest = payload;
    let value = rmpv::decode::read_value(&mut rest)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    let Value::Array(mut fields) = value else {
        return Err(shape("the batch is not an array"));
    };
    if fields.len() < 2 {
        return Err(shape("the batch has fewer than two fields"));
    }
    let timestamp = match &fields[0] {
        Value::F64(t) => *t,
        Value::F32(t) => f64::from(*t),
        Value::Integer(i) => i.as_f64().unwrap_or_default(),
        _ => return Err(shape("the timestamp is not a number")),
    };
    let data_parallel_rank = match fields.get(2) {
        None | Some(Value::Nil) => None,
        Some(Value::Integer(i)) => i.as_i64(),
        Some(_) => return Err(shape("the data-parallel rank is not an integer")),
    };
    let Value::Array(raw) = std::mem::replace(&mut fields[1], Value::Nil) else {
        return Err(shape("the events are not an array"));
    };
    let mut batch = EventBatch {
        timestamp,
        events: Vec::with_capacity(raw.len()),
        data_parallel_rank,
        unknown: 0,
    };
    for event in raw {
        match decode_event(event)? {
            Some(event) => batch.events.push(event),
            None => batch.unknown += 1,
        }
    }
    Ok(batch)
}

/// An event's fields by name, from either encoding.
struct Fields {
    tag: String,
    /// Map form: (name, value) pairs.
    named: Vec<(Value, Value)>,
    /// Array form: the values after the tag, in field order.
    positional: Vec<Value>,
}

impl Fields {
    /// The field `name`, declared at `index` among the struct's fields.
    fn take(&mut self, name: &str, index: usize) -> Option<Value> {
        if let Some((_, v)) = self
            .named
            .iter_mut()
            .find(|(k, _)| k.as_str() == Some(name))
        {
            return Some(std::mem::replace(v, Value::Nil));
        }
        self.positional
            .get_mut(index)
            .map(|v| std::mem::replace(v, Value::Nil))
    }

    fn required(&mut self, name: &str, index: usize) -> Result<Value, DecodeError> {
        self.take(name, index)
            .ok_or_else(|| shape(format!("{} has no {name}", self.tag)))
    }
}

/// One event; `None` for an unknown tag.
fn decode_event(value: Value) -> Result<Option<KvEvent>, DecodeError> {
    let mut fields = match value {
        Value::Map(named) => {
            let tag = named
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .and_then(|(_, v)| v.as_str())
                .ok_or_else(|| shape("an event map has no \"type\" tag"))?
                .to_owned();
            Fields {
                tag,
                named,
                positional: Vec::new(),
            }
        }
        Value::Array(mut items) if !items.is_empty() => {
            let tag = items
                .remove(0)
                .as_str()
                .ok_or_else(|| shape("an event array does not start with its tag"))?
                .to_owned();
            Fields {
                tag,
                named: Vec::new(),
                positional: items,
            }
        }
        _ => return Err(shape("an event is neither a map nor a tagged array")),
    };
    let event = match fields.tag.as_str() {
        "BlockStored" => {
            let block_hashes = hashes(fields.required("block_hashes", 0)?)?;
            let parent = match fields.required("parent_block_hash", 1)? {
                Value::Nil => None,
                v => Some(hash(v)?),
            };
            let token_ids = match fields.required("token_ids", 2)? {
                Value::Array(ids) => ids
                    .iter()
                    .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| shape("a token id is not a u32"))?,
                _ => return Err(shape("token_ids is not an array")),
            };
            let block_size = fields
                .required("block_size", 3)?
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| shape("block_size is not a positive u32"))?;
            let lora_id = fields.take("lora_id", 4).unwrap_or(Value::Nil);
            let medium = medium(fields.take("medium", 5))?;
            let lora_name = fields.take("lora_name", 6).unwrap_or(Value::Nil);
            let extra_keys = fields.take("extra_keys", 7).unwrap_or(Value::Nil);
            let keyed = !lora_id.is_nil()
                || !lora_name.is_nil()
                || match extra_keys {
                    Value::Array(keys) => keys.iter().any(|k| !k.is_nil()),
                    _ => false,
                };
            KvEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                medium,
                keyed,
            }
        }
        "BlockRemoved" => KvEvent::BlockRemoved {
            block_hashes: hashes(fields.required("block_hashes", 0)?)?,
            medium: medium(fields.take("medium", 1))?,
        },
        "AllBlocksCleared" => KvEvent::AllCleared,
        _ => return Ok(None),
    };
    Ok(Some(event))
}

fn hashes(value: Value) -> Result<Vec<EngineHash>, DecodeError> {
    match value {
        Value::Array(items) => items.into_iter().map(hash).collect(),
        _ => Err(shape("block_hashes is not an array")),
    }
}

fn hash(value: Value) -> Result<EngineHash, DecodeError> {
    match value {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|n| n as u64))
            .map(EngineHash::Int)
            .ok_or_else(|| shape("a block hash is out of range")),
        Value::Binary(bytes) => Ok(EngineHash::Bytes(bytes.into_boxed_slice())),
        _ => Err(shape("a block hash is neither an integer nor bytes")),
    }
}

fn medium(value: Option<Value>) -> Result<Option<String>, DecodeError> {
    match value {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::String(s)) => Ok(s.into_str()),
        Some(_) => Err(shape("medium is not a string")),
    }
}

fn shape(what: impl Into<String>) -> DecodeError {
    DecodeError::Shape(what.into())
}
