"""A tiny BERT encoder (and a tiny XLNet that LoRA cannot adapt) built from configs in a
temporary folder, with a WordPiece tokenizer from a hand-written vocabulary (never downloaded)."""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an this that it was is and but very really quite so not food service room staff movie book "
    "film show meal trip day hotel place good bad great terrible fine okay nice awful , . ! ?"
).split()


def _write_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 builds the WordPiece model from a token -> id mapping (no vocab_file argument).
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}, do_lower_case=True)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """Write a 2-layer BERT (hidden 32, 2 heads) and its tokenizer to `folder`; return it.

    Saved as a bare `BertModel`, like MiniLM: the classification head is new at fine-tuning time.
    """
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = _write_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def build_tiny_xlnet(folder: Path, seed: int = 0) -> Path:
    """A 1-layer XLNet: its attention weights are bare parameters, so LoRA's usual targets are absent."""
    import torch
    from transformers import XLNetConfig, XLNetModel

    tokenizer = _write_tokenizer(folder)
    torch.manual_seed(seed)
    config = XLNetConfig(vocab_size=len(tokenizer), d_model=16, n_layer=1, n_head=2, d_inner=32)
    XLNetModel(config).save_pretrained(folder)
    return folder
