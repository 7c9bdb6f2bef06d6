"""The demo tokenizer: 32k entries, digits split, round trips, loads in transformers and `tokenizers`."""

import json

from tokenizers import Tokenizer

from proto.fingerprint import tokenizer_hash


def test_vocab_and_round_trip(demo_slm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_slm_dir)
    assert len(tok) == 32000
    assert tok.model_input_names == ["input_ids", "attention_mask"] and tok.padding_side == "left"
    for text in ["Q:7+5-3+8 A:7+5=12;12-3=9;9+8=17 #17", "def f(x):\n    return x ** 2  # ünïcode ✓"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_digits_are_single_tokens(demo_slm_dir):
    tok = Tokenizer.from_file(str(demo_slm_dir / "tokenizer.json"))
    pieces = tok.encode("12345").tokens
    assert pieces[1:] == ["1", "2", "3", "4", "5"]


def test_edge_and_cloud_tokenizers_agree(demo_slm_dir):
    from transformers import AutoTokenizer

    text = "Q:3-4+9-1 A:"
    assert Tokenizer.from_file(str(demo_slm_dir / "tokenizer.json")).encode(text).ids == \
        AutoTokenizer.from_pretrained(demo_slm_dir)(text)["input_ids"]


def test_hash_ignores_formatting_but_not_content(tmp_path, demo_slm_dir):
    src = demo_slm_dir / "tokenizer.json"
    data = json.loads(src.read_text())
    reformatted = tmp_path / "a.json"
    reformatted.write_text(json.dumps(data, indent=4))
    assert tokenizer_hash(reformatted) == tokenizer_hash(src)
    changed = tmp_path / "b.json"
    vocab = data["model"]["vocab"]
    a, b = "Q", "A"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    changed.write_text(json.dumps(data))
    assert tokenizer_hash(changed) != tokenizer_hash(src)
