"""A small WordPiece tokenizer built in code, for tiny test encoders (no download).

The vocabulary holds the BERT special tokens, a few hundred caption words (ShapesWorld objects, colours, counts,
motions, spatial relations and common English words), and every lowercase letter, digit and punctuation mark both
as a word start and as a ``##`` continuation piece, so *any* ASCII caption tokenises without ``[UNK]``.
"""
from __future__ import annotations

import string
from typing import Iterable

from transformers import BertTokenizer

__all__ = ["SPECIAL_TOKENS", "CAPTION_WORDS", "build_tiny_tokenizer"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

CAPTION_WORDS = """
a an the one two three four five six some several many few single pair of and or with without on in at to from by
is are was were be being it its this that these those there here video clip scene shot frame image
circle circles square squares triangle triangles star stars diamond diamonds hexagon hexagons cross crosses
ellipse ellipses rectangle rectangles ball balls box boxes object objects shape shapes dot dots ring rings
red green blue yellow orange purple pink cyan magenta white black gray grey brown dark light bright colored
moving moves move left right up down upward downward still static stationary staying slowly quickly fast slow
above below beside next near far behind front top bottom middle center centre corner side across around toward
towards away into over under between background foreground plain textured empty sky ground water grass road
small large big tiny huge little bright dim shiny sharp blurry
person people man woman child dog cat car bird horse walking running jumping flying swimming driving sitting
standing playing dancing eating holding looking camera zoom pan rotating spinning falling rising bouncing
""".split()


def build_tiny_tokenizer(extra_words: Iterable[str] = ()) -> BertTokenizer:
    """Build a lower-casing BERT WordPiece tokenizer from an in-code vocabulary.

    Special tokens ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``; encodings look like
    ``[CLS] tokens... [SEP] [PAD]...``. ``extra_words`` are appended to the vocabulary (lower-cased).
    """
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [w.lower() for w in [*CAPTION_WORDS, *extra_words]]
    vocab_list = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *words, *("##" + c for c in chars)]))
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
