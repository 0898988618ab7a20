"""Offline tokenizers for the tiny models: built from a word list, no hub, any prompt tokenizes.

The tiny checkpoints save the *real* tokenizer classes (so `CLIPTokenizer.from_pretrained`,
`T5TokenizerFast.from_pretrained` and `AutoTokenizer` read them as they read the hub files), only with a
small vocabulary:

    clip_tokenizer()        CLIPTokenizer: byte-level BPE, 512 byte tokens + merges spelling PROMPT_WORDS,
                            then <|startoftext|>, <|endoftext|> last as in CLIP; never produces unk
    t5_tokenizer()          T5Tokenizer: unigram over "▁word" pieces and single characters, T5's ids
                            (pad 0, </s> 1, <unk> 2), no sentinel tokens
    bert_tokenizer()        BertTokenizer: WordPiece over [PAD] [UNK] [CLS] [SEP] [MASK] + words + letters
    word_level_tokenizer()  anything else: PreTrainedTokenizerFast over a word list, unknown words -> unk

Text-encoder configs must use the tokenizer's ids (`special_ids(tok)`) and `len(tok)` as vocab size.
"""
from __future__ import annotations

import string
from functools import lru_cache
from typing import Iterable

# Words common in text-to-image prompts (DrawBench, HPDv2, PartiPrompts style).
PROMPT_WORDS = tuple("""
a an the of and with in on at by for to from under over above below near behind next into is are
photo photograph picture painting drawing sketch illustration render image portrait close up view
cat dog bird horse cow sheep fish lion tiger bear elephant giraffe zebra monkey panda fox wolf rabbit
owl eagle duck frog turtle snake dragon unicorn robot astronaut man woman boy girl child person people
king queen knight wizard chef teacher doctor
car bus train truck bicycle motorcycle boat ship airplane rocket
house building castle tower bridge city street road room kitchen table chair bed sofa window door
tree flower forest garden grass mountain river lake sea ocean beach sky cloud sun moon star rain snow
apple banana orange pizza cake cup bowl bottle book clock lamp phone computer guitar piano
red yellow green blue purple pink black white gray brown golden silver colorful
big small large tiny tall old young happy sad beautiful cute dark bright
sitting standing running flying swimming eating reading holding wearing riding playing
hat glasses shirt dress
one two three four five six seven eight nine ten
style art digital oil watercolor cartoon anime realistic detailed high quality 4k 8k
sign text says word letter
""".split())


def _unique(words: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(w.lower() for w in words))


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one pre-tokenized word: byte symbols, "</w>" on the last, best-ranked merge first."""
    symbols = ["".join(_byte_to_unicode()[b] for b in ch.encode()) for ch in word]
    symbols[-1] += "</w>"
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def clip_tokenizer(vocab_words: Iterable[str] = PROMPT_WORDS, model_max_length: int = 77,
                   pad_token: str = "<|endoftext|>"):
    """A real `CLIPTokenizer` with a tiny byte-level BPE vocabulary.

    Layout as CLIP's: the 256 byte symbols, the same with the end-of-word mark "</w>", one token per
    merge (here: just the merges that make each word of `vocab_words` one token), then `<|startoftext|>`
    and `<|endoftext|>`.
    Pad is `<|endoftext|>` as in SD1.5's tokenizer (SD3's tokenizer_2 pads with "!": pass pad_token="!").
    """
    from transformers import CLIPTokenizer

    byte_symbols = [_byte_to_unicode()[b] for b in range(256)]
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    ranks: dict[tuple[str, str], int] = {}
    for word in _unique(vocab_words):
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:  # a merge of lowest priority cannot change the words already spelled
            ranks[symbols[0], symbols[1]] = len(ranks)
            if symbols[0] + symbols[1] not in tokens:
                tokens.append(symbols[0] + symbols[1])
            symbols = _bpe(word, ranks)
    merges = sorted(ranks, key=ranks.__getitem__)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)


def t5_tokenizer(vocab_words: Iterable[str] = PROMPT_WORDS, model_max_length: int = 256):
    """A real `T5Tokenizer` (unigram) with T5's special ids and a tiny vocabulary.

    Whole words ("▁cat") score higher than spelling them out; characters not in the table map to <unk>.
    """
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in _unique(vocab_words)]
    pieces += [(c, -8.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def bert_tokenizer(vocab_words: Iterable[str] = PROMPT_WORDS, model_max_length: int = 512):
    """A real `BertTokenizer` (WordPiece, lower case) over the words, with letters and "##letters" so
    unknown words are spelled out; ids [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4."""
    from transformers import BertTokenizer

    letters = string.ascii_lowercase + string.digits
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *letters,
              *("##" + c for c in letters), *_unique(vocab_words)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)


def word_level_tokenizer(
    vocab_words: Iterable[str] = PROMPT_WORDS,
    model_max_length: int = 77,
    *,
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    bos_token: str | None = None,
    eos_token: str | None = None,
    special_order: tuple[str, ...] = ("pad", "unk", "bos", "eos"),
    lowercase: bool = True,
    padding_side: str = "right",
):
    """A `PreTrainedTokenizerFast` over a fixed word list (whitespace + punctuation split).

    Special tokens take the first ids in `special_order` (those that are set), then the words. Encoding
    with special tokens gives `[bos] words [eos]`; unknown words become unk. Saves as a generic
    tokenizer: load it with `AutoTokenizer` / `PreTrainedTokenizerFast`, not a model-specific class.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    named = {"pad": pad_token, "unk": unk_token, "bos": bos_token, "eos": eos_token}
    specials = [named[k] for k in special_order if named[k] is not None]
    vocab: dict[str, int] = {}
    for token in [*specials, *(w.lower() if lowercase else w for w in vocab_words)]:
        vocab.setdefault(token, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    ends = [t for t in (bos_token, eos_token) if t is not None]
    if ends:
        head = [f"{bos_token}:0"] if bos_token else []
        tail = [f"{eos_token}:0"] if eos_token else []
        tail_b = [f"{eos_token}:1"] if eos_token else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*head, "$A:0", *tail]), pair=" ".join([*head, "$A:0", *tail, "$B:1", *tail_b]),
            special_tokens=[(t, vocab[t]) for t in ends])
    kwargs = {f"{k}_token": v for k, v in named.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   padding_side=padding_side, **kwargs)


def special_ids(tokenizer) -> dict[str, int]:
    """`{pad,bos,eos}_token_id` of a tokenizer (those it has), to pass to a text-encoder config."""
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    return {k: v for k, v in ids.items() if v is not None}
