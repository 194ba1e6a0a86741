//! The simulator's tokenizer: simple, documented, deterministic.
//!
//! Encoding: the text is split into pieces, each a token:
//! - a run of ASCII letters or digits, cut into chunks of at most 4 bytes,
//!   with one leading space attached to the first chunk (as byte-level BPE
//!   does);
//! - any other character (punctuation, a non-ASCII character, a newline)
//!   on its own; spaces not followed by a word are a piece each.
//!
//! So English prose costs about 1.3 tokens per word, close to the real BPE
//! vocabularies. A piece's id is a hash of its bytes modulo the vocabulary
//! size. Decoding maps an id to a short pronounceable piece (`" ka"`,
//! `"ron"`…), so output text is a deterministic function of the ids.
//!
//! With `bench sim --tokenizer tokenizer.json`, [`SimTokenizer::Hf`] counts
//! with the model's own tokenizer instead (the proxy's
//! [`sluice::tokens::HfTokenizer`], over the HF `tokenizers` crate): prompt
//! ids, and so `usage`, prefix-cache blocks and context-length checks, are
//! the real engine's. As vLLM does for a completions prompt, the file's
//! special tokens (a BOS) are added. Chat messages are still rendered with
//! the fixed template of [`Tokenizer::chat_prompt`], not the model's Jinja
//! chat template.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use sluice::tokens::HfTokenizer;
use sluice::tokens::Tokenizer as _;

/// What the simulator counts tokens with.
#[derive(Debug, Clone)]
pub enum SimTokenizer {
    /// The documented simple tokenizer.
    Simple(Tokenizer),
    /// A model's `tokenizer.json`.
    Hf(Arc<HfTokenizer>),
}

impl SimTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::Hf(Arc::new(HfTokenizer::from_file(path)?)))
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Self::Simple(t) => t.encode(text),
            Self::Hf(t) => t.encode(text),
        }
    }

    /// The text of one output token.
    pub fn decode_token(&self, id: u32) -> String {
        match self {
            Self::Simple(t) => t.decode_token(id),
            Self::Hf(t) => t.decode(&[id]),
        }
    }

    /// The vocabulary size a file fixes (output ids are drawn below it).
    pub fn vocab_size(&self) -> Option<u32> {
        match self {
            Self::Simple(_) => None,
            Self::Hf(t) => u32::try_from(t.vocab_size()).ok(),
        }
    }
}

/// Token ids: `0..vocab_size`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    vocab_size: u32,
}

const MAX_CHUNK: usize = 4;

impl Tokenizer {
    /// A tokenizer over `vocab_size` ids (at least 1).
    pub fn new(vocab_size: u32) -> Self {
        Self {
            vocab_size: vocab_size.max(1),
        }
    }

    /// The pieces of `text`, as described in the module docs.
    pub fn pieces(text: &str) -> Vec<&str> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let start = i;
            // One space glued to the word after it.
            if bytes[i] == b' ' && bytes.get(i + 1).is_some_and(u8::is_ascii_alphanumeric) {
                i += 1;
            }
            if bytes[i].is_ascii_alphanumeric() {
                let word_end = bytes[i..]
                    .iter()
                    .position(|b| !b.is_ascii_alphanumeric())
                    .map_or(bytes.len(), |p| i + p);
                let mut chunk_start = start;
                let mut j = i;
                while j < word_end {
                    let end = (j + MAX_CHUNK).min(word_end);
                    out.push(&text[chunk_start..end]);
                    chunk_start = end;
                    j = end;
                }
                i = word_end;
            } else {
                let len = text[i..].chars().next().map_or(1, char::len_utf8);
                out.push(&text[start..i + len]);
                i += len;
            }
        }
        out
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        Self::pieces(text)
            .into_iter()
            .map(|p| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                p.hash(&mut h);
                (h.finish() % u64::from(self.vocab_size)) as u32
            })
            .collect()
    }

    /// The text of one output token.
    pub fn decode_token(&self, id: u32) -> String {
        const C: &[u8] = b"bdfgklmnprstvz";
        const V: &[u8] = b"aeiou";
        let mut s = String::with_capacity(4);
        if id.is_multiple_of(3) {
            s.push(' ');
        }
        s.push(C[(id as usize / 3) % C.len()] as char);
        s.push(V[(id as usize / 42) % V.len()] as char);
        if !id.is_multiple_of(2) {
            s.push(C[(id as usize / 210) % C.len()] as char);
        }
        s
    }

    /// A chat conversation rendered to one prompt, with a fixed template
    /// (`<|role|>\ncontent\n` per message, then `<|assistant|>\n`).
    pub fn chat_prompt<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
        let mut s = String::new();
        for (role, content) in messages {
            s.push_str("<|");
            s.push_str(role);
            s.push_str("|>\n");
            s.push_str(content);
            s.push('\n');
        }
        s.push_str("<|assistant|>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_follow_the_documented_rules() {
        assert_eq!(
            Tokenizer::pieces("Hello world, evaluation!"),
            vec!["Hell", "o", " worl", "d", ",", " eval", "uati", "on", "!"]
        );
        assert_eq!(Tokenizer::pieces("a  b"), vec!["a", " ", " b"]);
        assert_eq!(Tokenizer::pieces("é\n"), vec!["é", "\n"]);
        assert!(Tokenizer::pieces("").is_empty());
    }

    #[test]
    fn encoding_is_deterministic_and_shares_prefixes() {
        let t = Tokenizer::new(4096);
        let a = t.encode("The rubric. Candidate one");
        let b = t.encode("The rubric. Candidate two");
        assert_eq!(a, t.encode("The rubric. Candidate one"));
        assert_eq!(a[..a.len() - 1], b[..b.len() - 1]);
        assert_ne!(a.last(), b.last());
        assert!(a.iter().all(|&id| id < 4096));
    }
}
