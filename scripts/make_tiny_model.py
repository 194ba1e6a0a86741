#!/usr/bin/env python3
"""Make the tiny, deterministic Llama model the real-vLLM tests serve.

No model hub is reachable, so everything is made locally:
  * a byte-level BPE tokenizer (vocab 4096, specials <unk> <s> </s> <pad>),
    trained with `tokenizers` on the Python standard library's *.py files and
    wrapped in `transformers.PreTrainedTokenizerFast` with a small chat
    template (vLLM's /v1/chat/completions needs one);
  * a randomly initialised `LlamaForCausalLM` (3.3 M parameters, seed 0,
    16384 positions), saved in bf16 safetensors.

Output is gibberish, but deterministic: the same bytes every run, and the same
text at temperature 0 from every server that loads it.

Usage: make_tiny_model.py OUTPUT_DIR   (run with the vLLM venv's python)
"""

import glob
import hashlib
import os
import sys
import sysconfig

VOCAB_SIZE = 4096
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def corpus_files():
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if len(files) < 50:
        sys.exit(f"make_tiny_model: too few stdlib *.py files under {stdlib}")
    return files


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(corpus_files(), trainer)
    return tok


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny_model.py OUTPUT_DIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = train_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=16384,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)

    n_params = sum(p.numel() for p in model.parameters())
    weights = os.path.join(out, "model.safetensors")
    with open(weights, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    print(
        f"tiny-llama: vocab {tok.get_vocab_size()}, {n_params / 1e6:.1f} M parameters, "
        f"model.safetensors sha256 {digest}…",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
