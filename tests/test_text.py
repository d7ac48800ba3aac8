"""Text classification TSVs (SST-2, SMS spam): real files, corrupt ones, tokenization."""

import hashlib

import numpy as np
import pytest

from fedsim.data import PAD_ID, load_dataset, vocab_record
from fedsim.data.text import (
    SEQ_LEN,
    VOCAB_SIZE,
    encode,
    phrase_overlap,
    text_dataset,
    token_id,
    tokenize,
)
from fedsim.errors import FedsimError


def test_tokenize_and_ids_are_deterministic():
    assert tokenize("Don't STOP, it's 2 good!") == ["don't", "stop", ",", "it's", "2", "good", "!"]
    ids = encode(["a b c", ""], seq_len=4)
    # the rule vocab.json states, computed here without fedsim
    expected = [
        2 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % 8190
        for w in "abc"
    ]
    assert ids.tolist() == [[*expected, PAD_ID], [PAD_ID] * 4]
    assert token_id("naïve") == 2 + int.from_bytes(
        hashlib.blake2b("naïve".encode(), digest_size=8).digest(), "little"
    ) % (VOCAB_SIZE - 2)


def test_the_vocabulary_does_not_depend_on_the_training_texts():
    # a word only one example has must change neither vocab.json nor the model's shape
    common = ["the cat sat", "the dog sat", "my password hunter2"]
    ds_a = text_dataset("t", (common, np.array([0, 1, 0])), (["x"], np.array([0])), 2)
    ds_b = text_dataset(
        "t", ([*common[:2], "my password is"], np.array([0, 1, 0])), (["x"], np.array([0])), 2
    )
    assert ds_a.vocab == ds_b.vocab and len(ds_a.vocab) == VOCAB_SIZE
    assert (
        vocab_record(ds_a) == vocab_record(ds_b)
        and "mod 8190" in vocab_record(ds_a)["tokenization"]
    )
    assert np.array_equal(ds_a.x_train[:2], ds_b.x_train[:2])


def test_sst2_real(shared_data):
    ds = load_dataset("sst2", shared_data / "sst2")
    assert (len(ds.y_train), len(ds.y_test)) == (67349, 1821)  # the header rows are skipped
    assert ds.x_train.shape == (67349, SEQ_LEN) and ds.task == "text-classification"
    assert ds.vocab[:2] == ("<pad>", "<unk>") and len(ds.vocab) == 8192
    assert set(np.unique(ds.y_train)) == {0, 1}
    first = [i for i in ds.x_train[0] if i != PAD_ID]  # CRLF: no '\r' token
    words = ["hide", "new", "secretions", "from", "the", "parental", "units"]
    assert first == [token_id(w) for w in words]
    record = vocab_record(ds)
    assert record["tokens"] == list(ds.vocab) and record["seq_len"] == SEQ_LEN


def test_sms_spam_real(shared_data):
    ds = load_dataset("sms-spam", shared_data / "sms-spam")
    assert len(ds.y_train) + len(ds.y_test) == 5574
    assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == [4827, 747]
    again = load_dataset("sms-spam", shared_data / "sms-spam")
    assert np.array_equal(ds.x_test, again.x_test) and ds.vocab == again.vocab


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("ham\tfine\nmaybe\tnot a label\n", "line 2: expected '<label><TAB><text>'"),
        ("ham\tfine\nspam\t   \n", "line 2: empty text"),
        ("ham fine, no tab\n", "line 1: expected"),
        ("", "no labelled rows"),
    ],
)
def test_corrupt_tsv_names_file_and_line(tmp_path, content, needle):
    (tmp_path / "sms.tsv").write_text(content)
    with pytest.raises(FedsimError, match=needle) as info:
        load_dataset("sms-spam", tmp_path)
    assert "sms.tsv" in str(info.value)


def test_sst2_crlf_header_and_missing_files(tmp_path):
    rows = "label\tsentence\r\n" + "".join(f"{i % 2}\tword{i % 3} and more\r\n" for i in range(20))
    (tmp_path / "train.tsv").write_bytes(rows.encode())
    with pytest.raises(FedsimError, match=r"dev.tsv: missing"):
        load_dataset("sst2", tmp_path)
    (tmp_path / "dev.tsv").write_bytes(rows.encode())
    ds = load_dataset("sst2", tmp_path)
    assert len(ds.y_train) == 20 and "\r" not in "".join(ds.vocab)
    (tmp_path / "dev.tsv").write_bytes(b"label\tsentence\n2\tbad label\n")
    with pytest.raises(FedsimError, match=r"dev.tsv, line 2"):
        load_dataset("sst2", tmp_path)
    (tmp_path / "dev.tsv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FedsimError, match=r"dev.tsv: cannot read as UTF-8"):
        load_dataset("sst2", tmp_path)


def _tree_phrases(words):
    """Every phrase of a balanced binary parse of ``words``, the sentence included."""
    if len(words) == 1:
        return [words]
    half = len(words) // 2
    return [words, *_tree_phrases(words[:half]), *_tree_phrases(words[half:])]


def test_a_word_of_a_phrase_treebank_lies_in_as_many_samples_as_declared():
    """GLUE's SST-2 has a sample per phrase of each sentence: changing one word changes
    every phrase holding it. Measured on such a file: never more than the loader says."""
    sentences = ["the movie is a really cool bit of fun", "no wit , only labored gags"]
    texts = [" ".join(p) for s in sentences for p in _tree_phrases(s.split())]
    declared = phrase_overlap(texts)
    most = 0
    for s in sentences:
        for j in range(len(s.split())):
            edited = s.split()
            edited[j] = "zzz"
            pairs = zip(_tree_phrases(s.split()), _tree_phrases(edited), strict=True)
            most = max(most, sum(old != new for old, new in pairs))
    assert declared == most == 5  # 8 words: a leaf, then 4 levels of the tree above it
    assert phrase_overlap(["a b", "c d"]) == 1  # samples that share nothing
