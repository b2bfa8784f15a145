"""A character-level tokenizer saved as ``tokenizer.json``, loadable by ``AutoTokenizer``.

Small models of our own (tests, demos, the reference models) need a real tokenizer file that
users' tools read the same way as a downloaded checkpoint's; one token per character keeps the
vocabulary tiny and every string encodable.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>")
DEFAULT_CHARS = string.digits + string.ascii_letters + " +-*/=#.,:;?!()[]<>'\"\n_|"


def build_char_tokenizer(chars: str = DEFAULT_CHARS):
    """A ``PreTrainedTokenizerFast`` whose ids are: the special tokens, then ``chars`` in order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", mask_token="<|mdm_mask|>", unk_token="<|pad|>",
        additional_special_tokens=["<|eot_id|>"])


def save_char_tokenizer(directory: str | Path, chars: str = DEFAULT_CHARS):
    """Write ``tokenizer.json`` and its config into ``directory``; returns the tokenizer."""
    tok = build_char_tokenizer(chars)
    tok.save_pretrained(str(directory))
    return tok
