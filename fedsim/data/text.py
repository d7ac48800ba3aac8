"""Text classification from TSV files, with a vocabulary that does not depend on the data.

Tokenization: lower-case, then runs of word characters (apostrophes kept inside words,
``don't``, ``'s``) and single punctuation marks, in order. Each token's id is a hash
bucket (``token_id``): ``<pad>`` is 0, ``<unk>`` 1 (never used for words), then 2 + the
token's 64-bit BLAKE2b digest modulo ``VOCAB_SIZE - 2``. A vocabulary built from the
training texts (say, every word seen twice) would be published with the run, in
``vocab.json`` and in the model's shape, and one example can decide whether its word is in
it: a release outside any ε. Hashing costs collisions between rare words instead. Each text
becomes its first ``SEQ_LEN`` token ids, padded on the right with 0. The same rule applies
to ``hf-text``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedsim.data.dataset import PAD_ID, TEXT_CLASSIFICATION, Dataset, token_array
from fedsim.data.split import stratified_split
from fedsim.errors import FedsimError

SEQ_LEN = 64
VOCAB_SIZE = 8192
PAD, UNK = "<pad>", "<unk>"
# bucket i is named "#i": the ids say which bucket, not which word
VOCAB = (PAD, UNK, *(f"#{i}" for i in range(2, VOCAB_SIZE)))
TOKEN = re.compile(r"[\w']+|[^\w\s]")
SST2_LABELS = {"0": 0, "1": 1}
SMS_LABELS = {"ham": 0, "spam": 1}


def tokenize(text: str) -> list[str]:
    """Lower-cased words (apostrophes kept) and punctuation marks, in order."""
    return TOKEN.findall(text.lower())


@functools.lru_cache(maxsize=1 << 20)
def token_id(token: str) -> int:
    """The id of ``token``: 2 + its 8-byte BLAKE2b digest (little-endian) mod VOCAB_SIZE - 2."""
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return 2 + int.from_bytes(digest, "little") % (VOCAB_SIZE - 2)


def encode(texts: Sequence[str], seq_len: int = SEQ_LEN) -> np.ndarray:
    """Token ids (N, seq_len): each text's first ``seq_len`` tokens, right-padded with 0."""
    rows = np.full((len(texts), seq_len), PAD_ID, dtype=np.int64)
    for row, text in zip(rows, texts, strict=True):
        tokens = tokenize(text)[:seq_len]
        row[: len(tokens)] = [token_id(t) for t in tokens]
    return token_array(rows, VOCAB_SIZE)


def text_dataset(
    name: str,
    train: tuple[list[str], np.ndarray],
    test: tuple[list[str], np.ndarray],
    num_classes: int,
) -> Dataset:
    """A text-classification ``Dataset`` from raw (texts, labels) train and test splits."""
    x_train, x_test = encode(train[0]), encode(test[0])
    return Dataset(
        name,
        x_train,
        train[1],
        x_test,
        test[1],
        num_classes,
        (SEQ_LEN,),
        TEXT_CLASSIFICATION,
        vocab=VOCAB,
    )


def read_labelled_tsv(path: Path, labels: dict[str, int]) -> tuple[list[str], np.ndarray]:
    """Rows ``label<TAB>text`` of ``path``; CRLF or LF line ends; blank lines skipped.

    A first row whose first column is ``label`` is a header and is skipped.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FedsimError(f"{path}: missing; point data-dir at the folder holding it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FedsimError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    header = bool(lines) and lines[0].partition("\t")[0].strip().lower() == "label"
    texts, ys = [], []
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label.strip() not in labels:
            raise FedsimError(
                f"{path}, line {number}: expected '<label><TAB><text>' with a label in "
                f"{{{', '.join(labels)}}}, got {line[:40]!r}"
            )
        if not text.strip():
            raise FedsimError(f"{path}, line {number}: empty text")
        texts.append(text.strip())
        ys.append(labels[label.strip()])
    if not texts:
        raise FedsimError(f"{path}: no labelled rows")
    return texts, np.asarray(ys, dtype=np.int64)


def load_sst2(data_dir: Path | None) -> Dataset:
    """SST-2 sentiment: ``train.tsv`` to train, ``test.tsv`` (else ``dev.tsv``) to test.

    Each file has a header row and columns ``label`` (0 or 1) and the sentence.
    """
    if data_dir is None:
        raise FedsimError("dataset sst2 needs data-dir: the folder with train.tsv and test.tsv")
    test_path = data_dir / "test.tsv"
    if not test_path.is_file():
        test_path = data_dir / "dev.tsv"
    train = read_labelled_tsv(data_dir / "train.tsv", SST2_LABELS)
    test = read_labelled_tsv(test_path, SST2_LABELS)
    # GLUE's file holds each phrase of every sentence: a word lies in several samples.
    # How many depends on the training data (26 in GLUE's: phrase_overlap), and a count
    # in the results would publish it, so it is declared uncounted
    return replace(text_dataset("sst2", train, test, 2), overlap=(0, "word"))


def phrase_overlap(texts: Sequence[str]) -> int:
    """The most of ``texts`` that one word of a sentence lies in, where texts are phrases.

    GLUE's SST-2 training file holds every phrase of each sentence's parse tree as a
    sample of its own, the sentence among them, so changing one word changes every
    sample that holds it. Counted from above: for each text and each of its words, the
    distinct texts that are a contiguous run of its words and hold that word (before
    truncation to ``SEQ_LEN`` tokens, which can only drop words from a sample).
    """
    known = {tuple(tokenize(t)) for t in texts}
    most = 1
    for words in known:
        cover = [0] * len(words)
        for i in range(len(words)):
            for k in range(i + 1, len(words) + 1):
                if words[i:k] in known:
                    cover[i:k] = [c + 1 for c in cover[i:k]]
        most = max(most, *cover) if cover else most
    return most


def load_sms_spam(data_dir: Path | None) -> Dataset:
    """UCI SMS Spam Collection: ``sms.tsv``, rows ``ham|spam<TAB>text``, no header.

    The 80/20 train/test split is stratified and fixed (independent of the seed).
    """
    if data_dir is None:
        raise FedsimError("dataset sms-spam needs data-dir: the folder with sms.tsv")
    texts, labels = read_labelled_tsv(data_dir / "sms.tsv", SMS_LABELS)
    x_train, x_test, y_train, y_test = stratified_split(np.asarray(texts, dtype=object), labels)
    return text_dataset("sms-spam", (list(x_train), y_train), (list(x_test), y_test), 2)
