"""Writes tiny_models/tokenizer/: a byte-level tokenizer (256 byte tokens + <s>, </s>), no merges.

Used with the tiny random models so that the CLI can tokenize calibration text offline. Run once:
    python tiny_models/make_tokenizer.py
"""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

byte_chars = pre_tokenizers.ByteLevel.alphabet()
vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
vocab.update({"<s>": 256, "</s>": 257})
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
fast.save_pretrained(Path(__file__).parent / "tokenizer")
