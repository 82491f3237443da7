"""The run's sentencepiece tokenizer as a Hugging Face fast tokenizer, and back.

`save_hf_tokenizer` writes tokenizer.json (a `tokenizers` BPE with byte fallback), tokenizer_config.json and
special_tokens_map.json, so `AutoTokenizer.from_pretrained(dir)` encodes any text to the ids
megaengine.data.Tokenizer gives and decodes them back to the text; the sentencepiece model itself is copied
as tokenizer.model, which tokenizer_config.json's explicit class keeps transformers from reading.
`hf_tokenizer_model` finds that model again in a Hugging Face directory, for `--load-hf`.

Why the BPE matches: sentencepiece merges the adjacent pair whose union is the best-scored piece (leftmost
first on ties); `tokenizers` merges the pair of lowest rank (leftmost first). Ranking every split (a, b) of a
piece by that piece's score gives the same merges. No special token is added by default, as the training data
has none in front of a document (megaengine.data writes `encode(doc) + [eod]`); literal "<s>" in text is text.

The model file is read with a small protobuf reader (sentencepiece ships no parser for it without protobuf).
"""
from __future__ import annotations

import json
import os
import shutil
import struct

from megaengine.errors import ConfigError

SPACE = "\u2581"  # sentencepiece's escaped space
SP_MODEL_FILE = "tokenizer.model"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2
# (field number, default) in sentencepiece_model.proto: TrainerSpec is field 2, NormalizerSpec field 3.
TRAINER_FIELDS = {"model_type": (3, 1), "treat_whitespace_as_suffix": (24, 0), "byte_fallback": (35, 0),
                  "unk_id": (40, 0), "bos_id": (41, 1), "eos_id": (42, 2), "pad_id": (43, -1)}
NORMALIZER_FIELDS = {"name": (1, b""), "precompiled_charsmap": (2, b""), "add_dummy_prefix": (3, 1),
                     "remove_extra_whitespaces": (4, 1), "escape_whitespaces": (5, 1)}


# ---- reading a sentencepiece model ----

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, value) of one protobuf message: int for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield key >> 3, value


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v  # proto2 writes negative int32 as 10-byte two's complement


def read_model(path: str) -> tuple[list[tuple[str, float, int]], dict]:
    """([(piece, score, type)] in id order, spec) of a sentencepiece .model file; spec holds the trainer and
    normalizer settings that decide how text encodes."""
    from megaengine.data import Tokenizer
    Tokenizer(path)  # a readable sentencepiece model, or a ConfigError saying what it is not
    with open(path, "rb") as f:
        data = f.read()
    pieces, sections = [], {}
    for field, value in _fields(data):
        if field == 1:
            p = dict(_fields(value))
            pieces.append((p[1].decode("utf-8"), struct.unpack("<f", p[2])[0] if 2 in p else 0.0, p.get(3, NORMAL)))
        elif field in (2, 3):
            sections[field] = dict(_fields(value))
    spec = {k: sections.get(2, {}).get(n, d) for k, (n, d) in TRAINER_FIELDS.items()}
    spec.update({k: sections.get(3, {}).get(n, d) for k, (n, d) in NORMALIZER_FIELDS.items()})
    for k in ("unk_id", "bos_id", "eos_id", "pad_id"):
        spec[k] = _int32(spec[k])
    return pieces, spec


def check_convertible(pieces: list, spec: dict, path: str) -> None:
    """ConfigError unless tokenizer.json can reproduce this model exactly: BPE with byte fallback, identity
    normalisation that keeps whitespace, and no user-defined or unused pieces (what train_tokenizer writes,
    and what LLaMA's tokenizer.model is)."""
    types = {t for _, _, t in pieces}
    problems = [msg for ok, msg in (
        (spec["model_type"] == BPE, "it is not a BPE model (model_type=bpe)"),
        (spec["byte_fallback"], "it has no byte fallback (byte_fallback=True)"),
        (not spec["precompiled_charsmap"],
         f"it normalises text (normalization_rule_name={spec['name'].decode() or 'custom'}; need identity)"),
        (not spec["remove_extra_whitespaces"], "it removes extra whitespace (need remove_extra_whitespaces=False)"),
        (spec["escape_whitespaces"], "it does not escape whitespace"),
        (not spec["treat_whitespace_as_suffix"], "it treats whitespace as a suffix"),
        (not types & {USER_DEFINED, UNUSED}, "it has user-defined or unused pieces"),
    ) if not ok]
    if problems:
        raise ConfigError(f"--tokenizer-model {path}: cannot be written as an exact Hugging Face tokenizer: "
                          f"{'; '.join(problems)}. Train it with megaengine.data.train_tokenizer, or export with "
                          "--no-tokenizer and ship the tokenizer yourself.")


# ---- writing the Hugging Face files ----

def fast_tokenizer(pieces: list, spec: dict):
    """The `tokenizers.Tokenizer` that encodes and decodes as the sentencepiece model does."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    except ImportError:
        raise ImportError("writing a Hugging Face tokenizer needs tokenizers (a dependency of transformers): "
                          "pip install tokenizers, or export with --no-tokenizer") from None
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece for piece, _, t in pieces if t == NORMAL}
    merges = []
    for piece, _, _ in sorted((p for p in pieces if p[2] == NORMAL), key=lambda p: -p[1]):  # stable: id order on ties
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
    unk = pieces[spec["unk_id"]][0]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    escape = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), escape]) if spec["add_dummy_prefix"] else escape
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if spec["add_dummy_prefix"] else steps)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, _, t in pieces if t in (UNKNOWN, CONTROL)])
    return tok


def special_tokens(pieces: list, spec: dict) -> dict[str, str]:
    names = {"unk_token": "unk_id", "bos_token": "bos_id", "eos_token": "eos_id", "pad_token": "pad_id"}
    return {name: pieces[spec[key]][0] for name, key in names.items() if 0 <= spec[key] < len(pieces)}


def special_ids(model_path: str) -> dict[str, int]:
    """bos/eos/pad ids for config.json and generation_config.json: generation stops at eos (megaengine's
    end-of-document id) and, with no pad piece, pads finished sequences with eos as transformers would after
    a warning."""
    _, spec = read_model(model_path)
    spec = dict(spec, pad_id=spec["pad_id"] if spec["pad_id"] >= 0 else spec["eos_id"])
    return {f"{k}_token_id": spec[f"{k}_id"] for k in ("bos", "eos", "pad") if spec[f"{k}_id"] >= 0}


def save_hf_tokenizer(model_path: str, output_dir: str, *, model_max_length: int,
                      vocab_size: int | None = None) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the sentencepiece model (as
    tokenizer.model) into output_dir. `vocab_size`: the model's, which the tokenizer must match. Returns the
    paths written."""
    pieces, spec = read_model(model_path)
    check_convertible(pieces, spec, model_path)
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ConfigError(f"--tokenizer-model {model_path} has {len(pieces)} pieces but the model's vocabulary "
                          f"is {vocab_size}: it is not the tokenizer this model was trained with.")
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, name) for name in
             ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", SP_MODEL_FILE)]
    fast_tokenizer(pieces, spec).save(paths[0])
    specials = special_tokens(pieces, spec)
    # The class is named so transformers reads tokenizer.json and never guesses a reader for tokenizer.model;
    # split_special_tokens keeps a literal "<s>" in text as text, as sentencepiece does.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "split_special_tokens": True,
              "model_max_length": model_max_length}
    for path, content in ((paths[1], config), (paths[2], specials)):
        with open(path, "w") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    if os.path.abspath(model_path) != os.path.abspath(paths[3]):
        shutil.copyfile(model_path, paths[3])
    return paths


# ---- reading it back ----

def hf_tokenizer_model(path: str, vocab_size: int | None = None) -> str:
    """The sentencepiece model of a Hugging Face directory (`<path>/tokenizer.model`, as save_hf_tokenizer and
    LLaMA checkpoints write it), for training on with megaengine.data.Tokenizer after `--load-hf path`.
    ConfigError when there is none (GPT-2's byte-level BPE is not sentencepiece), when the file is not a
    sentencepiece model, or when its size differs from `vocab_size` (the HF config's)."""
    from megaengine.data import Tokenizer
    model = os.path.join(path, SP_MODEL_FILE)
    if not os.path.isfile(model):
        found = [f for f in ("tokenizer.json", "vocab.json") if os.path.exists(os.path.join(path, f))]
        what = f"only {', '.join(found)} (not sentencepiece)" if found else "no tokenizer"
        raise ConfigError(f"--load-hf {path}: it has {what}, and megaengine trains with a sentencepiece "
                          f"{SP_MODEL_FILE}; pass --tokenizer-model PATH with --data-path encoded by it.")
    try:
        tokenizer = Tokenizer(model)
    except ConfigError as e:
        raise ConfigError(f"--load-hf {path}: {SP_MODEL_FILE} is not a sentencepiece model ({e}); pass "
                          "--tokenizer-model PATH with --data-path encoded by it.") from None
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise ConfigError(f"--load-hf {path}: {SP_MODEL_FILE} has {tokenizer.vocab_size} pieces but config.json "
                          f"says vocab_size={vocab_size}; pass the model's own --tokenizer-model.")
    return model
