"""The exported Hugging Face tokenizer gives megaengine's sentencepiece ids on any text and decodes them back;
`hf_tokenizer_model` finds the sentencepiece model again in an exported directory."""
import json.decoder
import random

import pytest
import transformers

from megaengine.data import IndexedDataset, Tokenizer, train_tokenizer
from megaengine.errors import ConfigError
from megaengine.tools import hf_tokenizer

NASTY = ["", " ", "   ", "\t", "\n", "\r\n", " x", "x ", "  leading", "trailing  \n", "def main(", "a\n\n\n\tb",
         "\t\t \n  \r\n\r\n", "    return x\n", "if x:\r\n\treturn\r\n", "😀 é e\u0301", "日本語のテキスト",
         "ǅ\u200b\ufeff", "\x00\x01\x7f", "<s>not a bos</s>", "<unk>", "<0x41>", "ﬁ ß \U0010fffd", "x" * 300,
         " " * 33 + "y", "1234567890", "λx. x²", "\u00a0nbsp\u2028line"]


@pytest.fixture(scope="module")
def exported(tiny_corpus, tmp_path_factory):
    """(megaengine Tokenizer, transformers tokenizer, export directory) for the tiny corpus's tokenizer."""
    out = str(tmp_path_factory.mktemp("hf_tok"))
    _, model = tiny_corpus
    hf_tokenizer.save_hf_tokenizer(model, out, model_max_length=16, vocab_size=Tokenizer(model).vocab_size)
    return Tokenizer(model), transformers.AutoTokenizer.from_pretrained(out), out


def random_texts(pieces: list[str], n: int, seed: int = 0) -> list[str]:
    """Concatenations of vocabulary pieces, whitespace runs, characters outside the vocabulary and specials."""
    rng = random.Random(seed)
    extras = [" ", "  ", "\t", "\n", "\r\n", "😀", "é", "日本", "\u2028", "<s>", "</s>"]

    def part():
        r = rng.random()
        if r < 0.5:
            return rng.choice(pieces)
        if r < 0.8:
            return rng.choice(extras)
        c = chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x2FFFF)]))  # no surrogates
        return c if c != hf_tokenizer.SPACE else "x"  # a literal U+2581 decodes as a space (as sentencepiece)

    return ["".join(part() for _ in range(rng.randint(1, 12))) for _ in range(n)]


def check_same(ours: Tokenizer, theirs, text: str) -> None:
    ids = ours.encode(text)
    assert theirs(text)["input_ids"] == ids, text
    assert theirs.decode(ids) == ours.decode(ids) == text, text


def test_ids_and_text_match_sentencepiece(exported, tiny_corpus):
    ours, theirs, _ = exported
    assert type(theirs).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert len(theirs) == ours.vocab_size
    for text in NASTY:
        check_same(ours, theirs, text)
    pieces = [theirs.convert_ids_to_tokens(i).replace(hf_tokenizer.SPACE, " ") for i in range(259, len(theirs))]
    for text in random_texts(pieces, 500):
        check_same(ours, theirs, text)
    # A sample of the corpus, from its stored ids: text -> the same ids -> the same text.
    prefix, _ = tiny_corpus
    data = IndexedDataset(prefix)
    for i in range(0, len(data), 3):
        ids = data.get(i).tolist()[:-1]  # the document's tokens without its end-of-document id
        text = ours.decode(ids)
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == text
    # sentencepiece reads a literal "\u2581" as a space; so does the export.
    assert theirs("a\u2581b")["input_ids"] == ours.encode("a\u2581b")


def test_special_tokens_are_never_added_or_read_from_text(exported):
    ours, theirs, _ = exported
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id) == (ours.bos, ours.eod, 0)
    assert theirs("x")["input_ids"] == ours.encode("x")  # no bos: training documents start without one
    ids = [ours.bos] + ours.encode("def f():\n") + [ours.eod]
    assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids) == "def f():\n"
    assert theirs.batch_decode([ids[1:-1]]) == ["def f():\n"]


def test_refuses_models_it_cannot_reproduce(tmp_path):
    docs = [open(json.decoder.__file__, encoding="utf-8").read()]
    unigram = train_tokenizer(iter(docs), str(tmp_path / "uni"), vocab_size=400, model_type="unigram")
    with pytest.raises(ConfigError, match="not a BPE model"):
        hf_tokenizer.save_hf_tokenizer(unigram, str(tmp_path / "out"), model_max_length=16)
    bpe = train_tokenizer(iter(docs), str(tmp_path / "bpe"), vocab_size=400)
    with pytest.raises(ConfigError, match="has 400 pieces but the model's vocabulary is 512"):
        hf_tokenizer.save_hf_tokenizer(bpe, str(tmp_path / "out"), model_max_length=16, vocab_size=512)
    (tmp_path / "junk.model").write_bytes(b"not sentencepiece")
    with pytest.raises(ConfigError, match="junk.model: not a readable sentencepiece model"):
        hf_tokenizer.save_hf_tokenizer(str(tmp_path / "junk.model"), str(tmp_path / "out"), model_max_length=16)
    assert not (tmp_path / "out").exists()


def test_hf_tokenizer_model_reads_the_export_back(exported, tmp_path):
    ours, _, out = exported
    path = hf_tokenizer.hf_tokenizer_model(out, vocab_size=ours.vocab_size)
    assert Tokenizer(path).encode("  def main(\n") == ours.encode("  def main(\n")
    with pytest.raises(ConfigError, match="pieces but config.json says vocab_size=50257"):
        hf_tokenizer.hf_tokenizer_model(out, vocab_size=50257)
    with pytest.raises(ConfigError, match=r"--load-hf .*: it has no tokenizer.*--tokenizer-model PATH"):
        hf_tokenizer.hf_tokenizer_model(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"only tokenizer.json \(not sentencepiece\)"):
        hf_tokenizer.hf_tokenizer_model(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"dGlrdG9rZW4= 0\n")  # a tiktoken file
    with pytest.raises(ConfigError, match="tokenizer.model is not a sentencepiece model"):
        hf_tokenizer.hf_tokenizer_model(str(tmp_path))
