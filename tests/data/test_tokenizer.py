"""Character tokenizer: round trip, reserved ids, unknown characters, HF save/load."""
import pytest

from rlgen.data.tokenizer import (CHARSET, build_tokenizer, decode_completion, encode, encode_batch,
                                  load_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_round_trip_one_token_per_character(tok):
    for text in ["047+085=", "3,7,9:30=(7-3)*9", "1.3..4.1=", "a b?"]:
        ids = encode(tok, text)
        assert len(ids) == len(text)
        assert tok.decode(ids) == text


def test_special_ids_are_distinct_and_fixed(tok):
    ids = [tok.pad_token_id, tok.mask_token_id, tok.eos_token_id]
    assert ids == [0, 1, 2]
    assert len(tok) == 3 + len(CHARSET)
    assert not set(ids) & set(encode(tok, CHARSET))


def test_unknown_character_names_the_text(tok):
    with pytest.raises(ValueError, match=r"'12€3'.*€"):
        encode(tok, "12€3")
    with pytest.raises(ValueError, match="X"):
        encode_batch(tok, ["1+2", "1X2"])


def test_decode_completion_cuts_at_eos_and_drops_mask(tok):
    ids = encode(tok, "12") + [tok.mask_token_id] + encode(tok, "3") + [tok.eos_token_id] + encode(tok, "99")
    assert decode_completion(tok, ids) == "123"


def test_save_and_load_hf_format(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert encode(again, "12*34=") == encode(tok, "12*34=")
    assert (again.mask_token_id, again.pad_token_id, again.eos_token_id) == (1, 0, 2)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nowhere")
