//! Prompt length in tokens, and the tokenizer that makes it exact.
//!
//! Without a tokenizer, token-id prompts are exact and text is estimated at
//! [`CHARS_PER_TOKEN`] characters per token (the usual rule of thumb for BPE
//! vocabularies on English text). With `--tokenizer tokenizer.json`,
//! [`HfTokenizer`] encodes text exactly as the engine's tokenizer does, so
//! the prefix tracker cuts the engine's own blocks.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::classify::Prompt;

/// Turns text into token ids for exact blocks (the prefix tracker's exact blocks).
pub trait Tokenizer: fmt::Debug + Send + Sync {
    /// The token ids of `text`, as the engine would see them.
    fn encode(&self, text: &str) -> Vec<u32>;
}

/// Characters per token assumed for text.
pub const CHARS_PER_TOKEN: usize = 4;

/// Estimated prompt tokens.
pub fn estimate(prompt: &Prompt) -> u32 {
    let tokens = match prompt {
        Prompt::Tokens(seqs) => seqs.iter().map(Vec::len).sum(),
        Prompt::Text(parts) => parts
            .iter()
            .map(|p| p.chars().count())
            .sum::<usize>()
            .div_ceil(CHARS_PER_TOKEN),
        Prompt::Messages(messages) => messages
            .iter()
            .map(|m| m.role.len() + m.content.chars().count() + 2)
            .sum::<usize>()
            .div_ceil(CHARS_PER_TOKEN),
    };
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// A Hugging Face `tokenizer.json` (the `tokenizers` crate), loaded once.
///
/// Encoding adds the special tokens the file's post-processor adds (a BOS
/// for Llama-style templates), as vLLM does for a completions prompt.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

/// Why a `tokenizer.json` could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot load tokenizer {path}: {reason}")]
pub struct TokenizerError {
    /// The file.
    pub path: String,
    /// What `tokenizers` said.
    pub reason: String,
}

impl HfTokenizer {
    /// Loads and checks `path` (a `tokenizer.json`): it must parse and
    /// encode a probe string.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let error = |reason: String| TokenizerError {
            path: path.display().to_string(),
            reason,
        };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| error(e.to_string()))?;
        // A prompt's tokens as the engine counts them: never cut, never padded.
        inner
            .with_truncation(None)
            .map_err(|e| error(e.to_string()))?;
        inner.with_padding(None);
        inner
            .encode_fast("Sluice", true)
            .map_err(|e| error(format!("encoding a probe failed: {e}")))?;
        Ok(Self {
            inner,
            path: path.to_owned(),
        })
    }

    /// Tokens in `text`.
    pub fn count(&self, text: &str) -> usize {
        self.encode(text).len()
    }

    /// The text of `ids` (special tokens skipped); empty if an id is unknown.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// The vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Tokenizer for HfTokenizer {
    /// Encoding only fails on inputs the model cannot represent (a
    /// truncation or padding setting gone wrong); that text then predicts
    /// no blocks, which is logged rather than failing the request.
    fn encode(&self, text: &str) -> Vec<u32> {
        match self.inner.encode_fast(text, true) {
            Ok(encoding) => encoding.get_ids().to_vec(),
            Err(err) => {
                tracing::debug!(error = %err, "tokenizer could not encode a prompt; no prefix prediction");
                Vec::new()
            }
        }
    }
}

impl fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates() {
        assert_eq!(estimate(&Prompt::Tokens(vec![vec![1, 2], vec![3]])), 3);
        assert_eq!(
            estimate(&Prompt::Text(vec!["abcdefgh".into(), "i".into()])),
            3
        );
    }

    /// A word-level `tokenizer.json` small enough to write inline: the
    /// loader, the encoder and the special-token template all run for real.
    pub(crate) fn word_level_json() -> String {
        let vocab = [
            "[UNK]",
            "<s>",
            "the",
            "rubric",
            "says",
            "score",
            "this",
            "candidate",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(id, word)| ((*word).to_owned(), id.into()))
            .collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        })
        .to_string()
    }

    fn write_temp(name: &str, contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("sluice-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn hf_tokenizer_encodes_with_the_files_special_tokens() {
        let path = write_temp("tokenizer.json", &word_level_json());
        let tokenizer = HfTokenizer::from_file(&path).unwrap();
        // BOS from the template, then one id per word; unknown words map to [UNK].
        assert_eq!(tokenizer.encode("the rubric says"), vec![1, 2, 3, 4]);
        assert_eq!(tokenizer.encode("score this zebra"), vec![1, 5, 6, 0]);
        assert_eq!(tokenizer.count("the candidate"), 3);
        assert_eq!(tokenizer.decode(&[1, 7, 2]), "candidate the");
        assert_eq!(tokenizer.vocab_size(), 8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn hf_tokenizer_rejects_a_bad_file_with_its_path() {
        let path = write_temp("not-a-tokenizer.json", "{\"model\": 3}");
        let err = HfTokenizer::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("not-a-tokenizer.json"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let missing = HfTokenizer::from_file(&path).unwrap_err();
        assert!(
            missing.to_string().contains("cannot load tokenizer"),
            "{missing}"
        );
    }
}
