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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::kv_events::fixture;

    fn pack(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).expect("writing to a Vec");
        out
    }

    fn map(pairs: Vec<(&str, Value)>) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    fn ints(ns: impl IntoIterator<Item = u64>) -> Value {
        Value::Array(ns.into_iter().map(Value::from).collect())
    }

    /// vLLM 0.32's shape: `[ts, [events as tagged maps], rank]`.
    #[test]
    fn tagged_maps() {
        let stored = map(vec![
            ("type", "BlockStored".into()),
            ("block_hashes", ints([u64::MAX, 7])),
            ("parent_block_hash", Value::Nil),
            ("token_ids", ints(0..8)),
            ("block_size", 4.into()),
            ("lora_id", Value::Nil),
            ("medium", "GPU".into()),
            ("lora_name", Value::Nil),
            ("extra_keys", Value::Array(vec![Value::Nil, Value::Nil])),
            ("group_idx", 0.into()),
        ]);
        let removed = map(vec![
            ("type", "BlockRemoved".into()),
            ("block_hashes", ints([7])),
            ("medium", Value::Nil),
        ]);
        let salted = map(vec![
            ("type", "BlockStored".into()),
            ("block_hashes", ints([9])),
            ("parent_block_hash", 7.into()),
            ("token_ids", ints(0..4)),
            ("block_size", 4.into()),
            ("lora_id", Value::Nil),
            ("medium", "CPU".into()),
            ("lora_name", Value::Nil),
            (
                "extra_keys",
                Value::Array(vec![Value::Array(vec!["salt".into()])]),
            ),
        ]);
        let cleared = map(vec![("type", "AllBlocksCleared".into())]);
        let future = map(vec![("type", "BlockPinned".into()), ("x", 1.into())]);
        let payload = pack(&Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![stored, future, removed, salted, cleared]),
            Value::from(0),
        ]));
        let batch = decode_batch(&payload).expect("decodes");
        assert_eq!(batch.timestamp, 1.5);
        assert_eq!(batch.data_parallel_rank, Some(0));
        assert_eq!(batch.unknown, 1);
        assert_eq!(
            batch.events,
            vec![
                KvEvent::BlockStored {
                    block_hashes: vec![EngineHash::Int(u64::MAX), EngineHash::Int(7)],
                    parent: None,
                    token_ids: (0..8).collect(),
                    block_size: 4,
                    medium: Some("GPU".into()),
                    keyed: false,
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![EngineHash::Int(7)],
                    medium: None,
                },
                KvEvent::BlockStored {
                    block_hashes: vec![EngineHash::Int(9)],
                    parent: Some(EngineHash::Int(7)),
                    token_ids: (0..4).collect(),
                    block_size: 4,
                    medium: Some("CPU".into()),
                    keyed: true,
                },
                KvEvent::AllCleared,
            ]
        );
    }

    /// Older releases: `array_like` events, `[tag, fields in order]`, and
    /// bytes hashes (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`); no rank.
    #[test]
    fn tagged_arrays_and_bytes_hashes() {
        let digest = Value::Binary(vec![0xab; 32]);
        let stored = Value::Array(vec![
            "BlockStored".into(),
            Value::Array(vec![digest.clone()]),
            Value::Binary(vec![1, 2]),
            ints(0..4),
            4.into(),
            Value::Nil,
            "GPU".into(),
        ]);
        let removed = Value::Array(vec!["BlockRemoved".into(), Value::Array(vec![digest])]);
        let cleared = Value::Array(vec!["AllBlocksCleared".into()]);
        let payload = pack(&Value::Array(vec![
            Value::F64(2.0),
            Value::Array(vec![stored, removed, cleared]),
        ]));
        let batch = decode_batch(&payload).expect("decodes");
        assert_eq!((batch.data_parallel_rank, batch.unknown), (None, 0));
        let digest = EngineHash::Bytes(vec![0xab; 32].into());
        assert_eq!(
            batch.events,
            vec![
                KvEvent::BlockStored {
                    block_hashes: vec![digest.clone()],
                    parent: Some(EngineHash::Bytes(vec![1, 2].into())),
                    token_ids: (0..4).collect(),
                    block_size: 4,
                    medium: Some("GPU".into()),
                    keyed: false,
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![digest],
                    medium: None,
                },
                KvEvent::AllCleared,
            ]
        );
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let batch =
            |events: Vec<Value>| pack(&Value::Array(vec![Value::F64(0.0), Value::Array(events)]));
        let bad: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xc1], // never used in msgpack
            pack(&Value::from("a string")),
            pack(&Value::Array(vec![Value::F64(0.0)])),
            pack(&Value::Array(vec!["ts".into(), Value::Array(vec![])])),
            pack(&Value::Array(vec![Value::F64(0.0), 3.into()])),
            batch(vec![map(vec![("block_hashes", ints([1]))])]),
            batch(vec![3.into()]),
            batch(vec![map(vec![
                ("type", "BlockStored".into()),
                ("block_hashes", ints([1])),
                ("parent_block_hash", Value::Nil),
                ("block_size", 4.into()),
            ])]),
            batch(vec![map(vec![
                ("type", "BlockRemoved".into()),
                ("block_hashes", Value::Array(vec!["not a hash".into()])),
            ])]),
            [batch(vec![]), vec![0]].concat(),
        ];
        for payload in bad {
            assert!(decode_batch(&payload).is_err(), "{payload:?}");
        }
        // Truncating a real payload anywhere gives an error, never a panic.
        let messages = fixture::messages(fixture::TOKENS);
        let payload = messages[0][2];
        for end in 0..payload.len() {
            assert!(decode_batch(&payload[..end]).is_err(), "cut at {end}");
        }
    }

    /// What vLLM 0.32 actually sent: integer hashes, block size 32, every
    /// stored block's tokens continuing its parent's, reproducing the prompts.
    #[test]
    fn the_real_engines_events() {
        let messages = fixture::messages(fixture::TOKENS);
        let prompts = fixture::prompts(fixture::TOKENS);
        assert!(messages.len() >= 5);
        // Each block's tokens from the start of its prompt, by engine hash.
        let mut prefixes: HashMap<EngineHash, Vec<u32>> = HashMap::new();
        let (mut stored, mut cleared) = (0, 0);
        let mut last_seq = None;
        for frames in &messages {
            let [topic, seq, payload] = frames.as_slice() else {
                panic!("{} frames", frames.len());
            };
            assert_eq!(*topic, b"kv");
            let seq = u64::from_be_bytes((*seq).try_into().expect("8 bytes"));
            assert!(last_seq.is_none_or(|last| seq == last + 1));
            last_seq = Some(seq);
            let batch = decode_batch(payload).expect("decodes");
            assert_eq!((batch.unknown, batch.data_parallel_rank), (0, Some(0)));
            for event in batch.events {
                match event {
                    KvEvent::BlockStored {
                        block_hashes,
                        parent,
                        token_ids,
                        block_size,
                        medium,
                        keyed,
                    } => {
                        stored += 1;
                        assert_eq!(block_size, 32);
                        assert_eq!((medium.as_deref(), keyed), (Some("GPU"), false));
                        assert_eq!(token_ids.len(), block_hashes.len() * 32);
                        let mut tokens = match &parent {
                            None => Vec::new(),
                            Some(p) => prefixes[p].clone(),
                        };
                        for (hash, block) in block_hashes.iter().zip(token_ids.chunks(32)) {
                            assert!(matches!(hash, EngineHash::Int(_)));
                            tokens.extend_from_slice(block);
                            prefixes.insert(hash.clone(), tokens.clone());
                        }
                    }
                    KvEvent::AllCleared => cleared += 1,
                    KvEvent::BlockRemoved { .. } => {}
                }
            }
        }
        assert!(stored >= prompts.len());
        assert_eq!(cleared, 2);
        // Every full block of every prompt was reported, with its prefix.
        for prompt in &prompts {
            for blocks in 1..=prompt.len() / 32 {
                let prefix = &prompt[..blocks * 32];
                assert!(
                    prefixes.values().any(|tokens| tokens == prefix),
                    "block {blocks} of a prompt"
                );
            }
        }
    }
}
