"""A tiny causal LM and tokenizer built from configs in a temporary folder (never downloaded)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Question: What does the fox do? Answer: it jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog. All in all, it was great, good, terrible, bad or okay.",
    "Review: the food was cold and the service slow. Sentiment: negative, neutral, positive.",
    "Jordan forgot his umbrella and got soaked walking home. How would Jordan feel? cold and annoyed",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


ARCHITECTURES = {
    # name: (config class, what its forward does to the head's logits, set large enough to matter)
    "llama": ("LlamaConfig", {}),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 2.0, "head_dim": 16, "query_pre_attn_scalar": 16}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
}


def build_tiny_model(folder: Path, max_positions: int = 512, seed: int = 0, architecture: str = "llama") -> Path:
    """Write a 2-layer causal LM (Llama unless `architecture` names another of `ARCHITECTURES`)
    with a byte-level BPE tokenizer to `folder` and return it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config_class, extra = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        **extra,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
