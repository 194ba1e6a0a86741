//! Which route a request is on, and — for completions and chat — a typed view
//! of its JSON body, parsed once for the later stages (tenant keys, the
//! admission policy, prefix tracking). The original bytes are forwarded
//! unchanged; this view is only read.

use std::borrow::Cow;
use std::fmt;

use http::Method;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::ProxyError;

/// A bounded set of route labels (metrics never see raw paths).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `/v1/models`
    Models,
    /// `/v1/embeddings`
    Embeddings,
    /// Anything else (vLLM's `/tokenize`, `/version`, `/health`, ...).
    Other,
}

impl Route {
    /// Every route, in declaration order (`route as usize` indexes it).
    pub const ALL: [Self; 5] = [
        Self::Completions,
        Self::ChatCompletions,
        Self::Models,
        Self::Embeddings,
        Self::Other,
    ];

    /// Classifies a request by method and path.
    pub fn of(method: &Method, path: &str) -> Self {
        match (method, path.trim_end_matches('/')) {
            (&Method::POST, "/v1/completions") => Self::Completions,
            (&Method::POST, "/v1/chat/completions") => Self::ChatCompletions,
            (_, p) if p.starts_with("/v1/models") => Self::Models,
            (_, "/v1/embeddings") => Self::Embeddings,
            _ => Self::Other,
        }
    }

    /// Whether the body is parsed and the request goes through admission.
    pub fn is_inference(self) -> bool {
        matches!(self, Self::Completions | Self::ChatCompletions)
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Completions => "completions",
            Self::ChatCompletions => "chat_completions",
            Self::Models => "models",
            Self::Embeddings => "embeddings",
            Self::Other => "other",
        }
    }
}

/// The prompt of a completions request, or the messages of a chat request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `prompt` as one or more strings.
    Text(Vec<String>),
    /// `prompt` as token ids (one or more sequences).
    Tokens(Vec<Vec<u32>>),
    /// Chat `messages`: (role, text content).
    Messages(Vec<ChatMessage>),
}

/// One chat message, reduced to what prefix tracking needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The text parts of `content`, concatenated.
    pub content: String,
}

/// The typed view of a completions or chat request body.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRequest {
    /// `model` ("" when absent: vLLM then uses its served model).
    pub model: String,
    /// `prompt` or `messages`.
    pub prompt: Prompt,
    /// `max_tokens` (or chat's `max_completion_tokens`).
    pub max_tokens: Option<u32>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `user`.
    pub user: Option<String>,
}

/// The fields Sluice reads, borrowed from the body as raw JSON: the body is
/// scanned once, every other field is skipped without being built, and only
/// these few are turned into values (callgrind: a `Value` of the whole body
/// cost about 5,300 instructions for a 60-byte request). A field given as
/// `null` is kept (`Some("null")`), and a repeated key keeps its last value,
/// as a `Value` (and vLLM) would.
#[derive(Default)]
struct Fields<'a> {
    model: Option<&'a RawValue>,
    prompt: Option<&'a RawValue>,
    messages: Option<&'a RawValue>,
    max_tokens: Option<&'a RawValue>,
    max_completion_tokens: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
    stream_options: Option<&'a RawValue>,
    user: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Fields::default();
                while let Some(Key(key)) = map.next_key()? {
                    let slot = match &*key {
                        "model" => &mut fields.model,
                        "prompt" => &mut fields.prompt,
                        "messages" => &mut fields.messages,
                        "max_tokens" => &mut fields.max_tokens,
                        "max_completion_tokens" => &mut fields.max_completion_tokens,
                        "stream" => &mut fields.stream,
                        "stream_options" => &mut fields.stream_options,
                        "user" => &mut fields.user,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// An object key, borrowed unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// A field's value: `None` when absent. Skipping a value does not check its
/// `\u` escapes, so a bad one is found here, as a whole-body parse found it.
fn value(raw: Option<&RawValue>) -> Result<Option<Value>, ProxyError> {
    raw.map(|r| serde_json::from_str(r.get()).map_err(not_json))
        .transpose()
}

/// [`value`], with an absent field as `Null`.
fn value_or_null(raw: Option<&RawValue>) -> Result<Value, ProxyError> {
    Ok(value(raw)?.unwrap_or(Value::Null))
}

fn not_json(e: serde_json::Error) -> ProxyError {
    bad(format!("request body is not valid JSON: {e}"))
}

impl InferenceRequest {
    /// Parses a body for `route` (completions or chat), naming the first problem found.
    pub fn parse(route: Route, body: &[u8]) -> Result<Self, ProxyError> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            serde_json::from_slice::<IgnoredAny>(body).map_err(not_json)?;
            return Err(bad("request body must be a JSON object"));
        }
        let fields: Fields<'_> = serde_json::from_slice(body).map_err(not_json)?;
        let prompt = match route {
            Route::ChatCompletions => Prompt::Messages(messages(value(fields.messages)?)?),
            _ => prompt(fields.prompt)?,
        };
        let max_tokens = match opt_u32(value_or_null(fields.max_tokens)?, "max_tokens")? {
            Some(n) => Some(n),
            None => opt_u32(
                value_or_null(fields.max_completion_tokens)?,
                "max_completion_tokens",
            )?,
        };
        let include_usage = match value_or_null(fields.stream_options)? {
            Value::Null => false,
            Value::Object(mut o) => opt_bool(
                o.remove("include_usage").unwrap_or(Value::Null),
                "stream_options.include_usage",
            )?
            .unwrap_or(false),
            _ => return Err(bad("`stream_options` must be an object")),
        };
        Ok(Self {
            model: opt_str(value_or_null(fields.model)?, "model")?.unwrap_or_default(),
            prompt,
            max_tokens,
            stream: opt_bool(value_or_null(fields.stream)?, "stream")?.unwrap_or(false),
            include_usage,
            user: opt_str(value_or_null(fields.user)?, "user")?,
        })
    }

    /// The text the engine sees as a prefix, for prefix tracking and token estimates.
    /// Chat messages are rendered canonically: `role\ncontent\n` per message.
    pub fn prompt_text(&self) -> String {
        match &self.prompt {
            Prompt::Text(parts) => parts.concat(),
            Prompt::Tokens(_) => String::new(),
            Prompt::Messages(messages) => {
                let mut out = String::new();
                for m in messages {
                    out.push_str(&m.role);
                    out.push('\n');
                    out.push_str(&m.content);
                    out.push('\n');
                }
                out
            }
        }
    }
}

fn bad(message: impl Into<String>) -> ProxyError {
    ProxyError::InvalidRequest(message.into())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn opt_str(value: Value, key: &str) -> Result<Option<String>, ProxyError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(bad(format!(
            "`{key}` must be a string, not {}",
            type_name(&other)
        ))),
    }
}

fn opt_bool(value: Value, name: &str) -> Result<Option<bool>, ProxyError> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(b)),
        other => Err(bad(format!(
            "`{name}` must be a boolean, not {}",
            type_name(&other)
        ))),
    }
}

fn opt_u32(value: Value, key: &str) -> Result<Option<u32>, ProxyError> {
    match value {
        Value::Null => Ok(None),
        v => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, not {v}"))),
    }
}

/// `prompt`: `None` when the field is absent (a JSON `null` is present, and invalid).
///
/// Read straight into its typed form: a prompt of token ids is built as
/// `u32`s, never as a JSON `Value` per id (32 bytes and an allocation
/// each, about 7× the body for a long token-id prompt).
fn prompt(raw: Option<&RawValue>) -> Result<Prompt, ProxyError> {
    let raw = raw.ok_or_else(|| bad("`prompt` is required"))?;
    let form: PromptForm = serde_json::from_str(raw.get()).map_err(not_json)?;
    match form {
        PromptForm::Valid(prompt) => Ok(prompt),
        PromptForm::Empty => Err(bad("`prompt` must not be empty")),
        PromptForm::Invalid => Err(bad(
            "`prompt` must be a string, an array of strings, an array of token ids, \
             or an array of token-id arrays",
        )),
    }
}

/// What a `prompt` value turned out to be (a wrong shape is not a JSON
/// error: the whole value is still read, so JSON errors come first).
enum PromptForm {
    Valid(Prompt),
    Empty,
    Invalid,
}

/// One element of a `prompt` array.
enum PromptItem {
    Text(String),
    Id(u32),
    Ids(Vec<u32>),
    Invalid,
}

/// A token id: a JSON integer that fits in `u32`.
struct TokenId(Option<u32>);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match deserializer.deserialize_any(ItemVisitor)? {
            PromptItem::Id(id) => TokenId(Some(id)),
            _ => TokenId(None),
        })
    }
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemVisitor)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = PromptItem;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a prompt element")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
        Ok(PromptItem::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<PromptItem, E> {
        Ok(PromptItem::Text(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
        Ok(u32::try_from(v).map_or(PromptItem::Invalid, PromptItem::Id))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
        Ok(u32::try_from(v).map_or(PromptItem::Invalid, PromptItem::Id))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<PromptItem, E> {
        Ok(PromptItem::Invalid)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<PromptItem, E> {
        Ok(PromptItem::Invalid)
    }

    fn visit_unit<E: de::Error>(self) -> Result<PromptItem, E> {
        Ok(PromptItem::Invalid)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PromptItem, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(PromptItem::Invalid)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PromptItem, A::Error> {
        let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        let mut valid = true;
        while let Some(TokenId(id)) = seq.next_element()? {
            match id {
                Some(id) if valid => ids.push(id),
                _ => valid = false,
            }
        }
        Ok(if valid {
            PromptItem::Ids(ids)
        } else {
            PromptItem::Invalid
        })
    }
}

impl<'de> Deserialize<'de> for PromptForm {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FormVisitor;
        impl<'de> Visitor<'de> for FormVisitor {
            type Value = PromptForm;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptForm, E> {
                Ok(PromptForm::Valid(Prompt::Text(vec![v.to_owned()])))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<PromptForm, E> {
                Ok(PromptForm::Valid(Prompt::Text(vec![v])))
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<PromptForm, E> {
                Ok(PromptForm::Invalid)
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<PromptForm, E> {
                Ok(PromptForm::Invalid)
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<PromptForm, E> {
                Ok(PromptForm::Invalid)
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<PromptForm, E> {
                Ok(PromptForm::Invalid)
            }

            fn visit_unit<E: de::Error>(self) -> Result<PromptForm, E> {
                Ok(PromptForm::Invalid)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PromptForm, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(PromptForm::Invalid)
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PromptForm, A::Error> {
                // The first element decides the form; every other must match it.
                let (mut texts, mut ids, mut sequences) = (Vec::new(), Vec::new(), Vec::new());
                let mut valid = true;
                while let Some(item) = seq.next_element::<PromptItem>()? {
                    if !valid {
                        continue;
                    }
                    let first = texts.is_empty() && ids.is_empty() && sequences.is_empty();
                    match item {
                        PromptItem::Text(t) if first || !texts.is_empty() => texts.push(t),
                        PromptItem::Id(id) if first || !ids.is_empty() => ids.push(id),
                        PromptItem::Ids(seq) if first || !sequences.is_empty() => {
                            sequences.push(seq);
                        }
                        _ => valid = false,
                    }
                }
                Ok(if !valid {
                    PromptForm::Invalid
                } else if !texts.is_empty() {
                    PromptForm::Valid(Prompt::Text(texts))
                } else if !ids.is_empty() {
                    PromptForm::Valid(Prompt::Tokens(vec![ids]))
                } else if !sequences.is_empty() {
                    PromptForm::Valid(Prompt::Tokens(sequences))
                } else {
                    PromptForm::Empty
                })
            }
        }
        deserializer.deserialize_any(FormVisitor)
    }
}

fn messages(value: Option<Value>) -> Result<Vec<ChatMessage>, ProxyError> {
    let items = match value {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(bad("`messages` must not be empty")),
        None => return Err(bad("`messages` is required")),
        Some(other) => {
            return Err(bad(format!(
                "`messages` must be an array, not {}",
                type_name(&other)
            )));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(m) = item else {
                return Err(bad(format!("`messages[{i}]` must be an object")));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) => r.clone(),
                _ => return Err(bad(format!("`messages[{i}].role` must be a string"))),
            };
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match part.get("text") {
                            Some(Value::String(t)) => text.push_str(t),
                            Some(_) => {
                                return Err(bad(format!(
                                    "`messages[{i}].content[{j}].text` must be a string"
                                )));
                            }
                            None => {} // images, audio: not part of the text prefix
                        }
                    }
                    text
                }
                Some(other) => {
                    return Err(bad(format!(
                        "`messages[{i}].content` must be a string or an array of parts, not {}",
                        type_name(other)
                    )));
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_all_is_indexed_by_the_discriminant() {
        for (i, route) in Route::ALL.into_iter().enumerate() {
            assert_eq!(route as usize, i, "{route:?}");
        }
    }

    fn parse(route: Route, body: &str) -> Result<InferenceRequest, String> {
        InferenceRequest::parse(route, body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn routes_are_bounded_labels() {
        assert_eq!(
            Route::of(&Method::POST, "/v1/completions"),
            Route::Completions
        );
        assert_eq!(
            Route::of(&Method::POST, "/v1/chat/completions/"),
            Route::ChatCompletions
        );
        assert_eq!(
            Route::of(&Method::GET, "/v1/chat/completions"),
            Route::Other
        );
        assert_eq!(Route::of(&Method::GET, "/v1/models/tiny"), Route::Models);
        assert_eq!(Route::of(&Method::POST, "/tokenize"), Route::Other);
        assert!(Route::Completions.is_inference());
        assert!(!Route::Embeddings.is_inference());
    }

    #[test]
    fn completion_fields_are_typed() {
        let r = parse(
            Route::Completions,
            r#"{"model":"m","prompt":"hi","max_tokens":16,"stream":true,
                "stream_options":{"include_usage":true},"user":"u1","temperature":0}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.prompt, Prompt::Text(vec!["hi".into()]));
        assert_eq!(r.max_tokens, Some(16));
        assert!(r.stream && r.include_usage);
        assert_eq!(r.user.as_deref(), Some("u1"));
    }

    #[test]
    fn prompt_forms() {
        let r = parse(Route::Completions, r#"{"prompt":["a","b"]}"#).unwrap();
        assert_eq!(r.prompt_text(), "ab");
        let r = parse(Route::Completions, r#"{"prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![vec![1, 2, 3]]));
        let r = parse(Route::Completions, r#"{"prompt":[[1],[2,3]]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![vec![1], vec![2, 3]]));
        assert!(parse(Route::Completions, r#"{"prompt":[1,"a"]}"#).is_err());
        let r = parse(Route::Completions, r#"{"prompt":[[]]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![vec![]]));
    }

    #[test]
    fn wrong_prompt_shapes_are_refused_after_the_json_is_read() {
        for prompt in [
            "[1,-1]",
            "[4294967296]",
            "[1,2.5]",
            r#"[[1],"a"]"#,
            r#"["a",[1]]"#,
            r#"[[1,"a"]]"#,
            r#"{"a":[1]}"#,
            r#"[1,{"x":[1,2]}]"#,
            "true",
            "7",
        ] {
            let e = parse(Route::Completions, &format!(r#"{{"prompt":{prompt}}}"#)).unwrap_err();
            assert!(e.contains("`prompt` must be a string"), "{prompt}: {e}");
        }
        let e = parse(Route::Completions, r#"{"prompt":[]}"#).unwrap_err();
        assert!(e.contains("must not be empty"), "{e}");
        let e = parse(Route::Completions, r#"{"prompt":[1,2,}"#).unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn a_long_token_id_prompt_is_read_as_u32s() {
        let ids: Vec<String> = (0..100_000u32).map(|i| (i * 7).to_string()).collect();
        let body = format!(r#"{{"prompt":[{}]}}"#, ids.join(","));
        let r = parse(Route::Completions, &body).unwrap();
        let Prompt::Tokens(seqs) = r.prompt else {
            panic!("not tokens")
        };
        assert_eq!(seqs.len(), 1);
        assert_eq!(seqs[0].len(), 100_000);
        assert_eq!(seqs[0][99_999], 99_999 * 7);
    }

    #[test]
    fn chat_is_rendered_canonically() {
        let r = parse(
            Route::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"system","content":"rubric"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "max_completion_tokens":5}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_text(), "system\nrubric\nuser\nab\n");
        assert_eq!(r.max_tokens, Some(5));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(
            parse(Route::Completions, "{not json")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(
            parse(Route::Completions, "[]")
                .unwrap_err()
                .contains("JSON object")
        );
        assert!(
            parse(Route::Completions, r#"{"model":"m"}"#)
                .unwrap_err()
                .contains("`prompt` is required")
        );
        let e = parse(Route::Completions, r#"{"prompt":"x","max_tokens":"ten"}"#).unwrap_err();
        assert!(e.contains("`max_tokens`"), "{e}");
        let e = parse(Route::Completions, r#"{"prompt":"x","max_tokens":-1}"#).unwrap_err();
        assert!(e.contains("`max_tokens`"), "{e}");
        let e = parse(Route::Completions, r#"{"prompt":"x","stream":"yes"}"#).unwrap_err();
        assert!(e.contains("`stream` must be a boolean"), "{e}");
        let e = parse(Route::Completions, r#"{"prompt":"x","model":5}"#).unwrap_err();
        assert!(e.contains("`model` must be a string"), "{e}");
        let e = parse(Route::ChatCompletions, r#"{"messages":[{"content":"x"}]}"#).unwrap_err();
        assert!(e.contains("messages[0].role"), "{e}");
        let e = parse(Route::ChatCompletions, r#"{"messages":{}}"#).unwrap_err();
        assert!(e.contains("must be an array"), "{e}");
        let e = parse(Route::ChatCompletions, r#"{"messages":null}"#).unwrap_err();
        assert!(e.contains("must be an array, not null"), "{e}");
        let e = parse(Route::Completions, r#"{"prompt":null}"#).unwrap_err();
        assert!(e.contains("`prompt` must be a string"), "{e}");
        // Skipped values are not checked for escapes; the fields read are.
        let e = parse(Route::Completions, r#"{"prompt":"x","model":"\ud800"}"#).unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let r = parse(
            Route::Completions,
            r#"{"model":"a","prompt":"x","model":"b"}"#,
        )
        .unwrap();
        assert_eq!(r.model, "b");
        let r = parse(
            Route::Completions,
            r#"{"\u006dodel":"escaped","prompt":"x"}"#,
        )
        .unwrap();
        assert_eq!(r.model, "escaped");
    }
}
