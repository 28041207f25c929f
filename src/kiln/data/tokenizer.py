"""Byte-level BPE tokenizers (HF `tokenizers`): training, loading, and the special tokens kiln uses."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.errors import KilnError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Chat roles for SFT and alignment: <|user|> text <|end|> <|assistant|> text <|end|>
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the special tokens take ids 0..6."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise KilnError(f"data.tokenizer.vocab_size={vocab_size} is too small; byte-level BPE needs at least 264")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json (or the directory holding it): one `kiln prepare` trained, which has kiln's
    special tokens, or an imported model's (`chat.json` beside it says which ids are what)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise KilnError(f"tokenizer '{p}' not found; run `kiln prepare` first or set data.tokenizer.path")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise KilnError(f"tokenizer '{p}' cannot be read ({str(e).splitlines()[0]}); re-run `kiln prepare`") from None
    if (p.parent / "chat.json").is_file():
        return tok  # an imported model's tokenizer, kept as it was: its ids are recorded in chat.json
    for s in (BOS, EOS):
        if tok.token_to_id(s) is None:
            raise KilnError(f"tokenizer '{p}' lacks the special token {s}; train it with `kiln prepare`")
    return tok


def token_count(tok: Tokenizer) -> int:
    """How many ids the tokenizer can produce (its largest id + 1): the model's vocabulary rows past
    them are padding, left out of every softmax (`kiln.train.objectives.token_cross_entropy`)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"
