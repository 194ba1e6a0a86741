//! Prompt length in tokens without a tokenizer: token-id prompts are exact,
//! text is estimated at [`CHARS_PER_TOKEN`] characters per token (the usual
//! rule of thumb for BPE vocabularies on English text).

use crate::classify::Prompt;

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
}
