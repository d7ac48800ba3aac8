r"""Shakespeare as LEAF's next-character task, one natural user per speaking role.

Two source formats, told apart by the files in ``data-dir``:

- plain text (``*.txt``, e.g. tinyshakespeare's ``input.txt``): each speech starts with a
  line ``NAME:`` after a blank line; one user per speaker name;
- the plays in Markdown (``**/*.md``): ``# Title``, ``## ACT``, ``### SCENE``, a speaker line
  ``**ROLE**`` before each speech and stage directions in ``_..._``; one user per
  (play, role), named ``<play file stem>/<ROLE>``.

A role's text is its speeches in order, each speech on one line (its lines joined by
spaces, stage directions removed), speeches separated by ``\n``. Samples are LEAF's: every
80-character window of a role's text, labelled with the character that follows. The last
20% of each role's windows are held out for the test set, so no test label is ever a
training input; the test set is capped at ``MAX_TEST`` windows spread evenly over all roles.
Characters are ids in the fixed ``VOCAB`` (newline and printable ASCII); any other character
is ``<unk>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fedsim.data.dataset import NEXT_CHAR, UNK_ID, Dataset, token_array
from fedsim.errors import FedsimError

SEQ_LEN = 80
TEST_FRACTION = 0.2
MAX_TEST = 2000
PAD, UNK = "<pad>", "<unk>"
# fixed, not the training text's characters: that set would be published (vocab.json, the
# model's shape) and one speech can decide whether its rare character is in it
VOCAB = (PAD, UNK, "\n", *map(chr, range(32, 127)))  # PAD_ID 0, UNK_ID 1, printable ASCII
PLAIN_SPEAKER = re.compile(r"([^\s:][^:]*):")
MD_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
# inline stage directions: _Aside_, *Sound a horn.*, [Within]; then stray markup
MD_INLINE_DIRECTION = re.compile(r"_+[^_]*_+|(?<!\*)\*[^*]+\*(?!\*)|\[[^\]]*\]")
MD_MARKUP = re.compile(r"[_*]")
MD_ESCAPE = re.compile(r"\\(.)")
SPACES = re.compile(r"\s+")


def load_shakespeare(data_dir: Path | None) -> Dataset:
    """Next-character prediction on Shakespeare, one user per speaking role (LEAF).

    A training window starts at every character, so one character lies in up to 81 of
    them: the dataset says so (``overlap``), and runs report that group's ε.
    """
    return role_windows(_roles(data_dir), name="shakespeare")


def load_shakespeare_disjoint(data_dir: Path | None) -> Dataset:
    """:func:`load_shakespeare` with training windows that share no character.

    They start every 81 characters, so each character of a role's training text is in
    exactly one training sample, and the sample ε is a character's. 81 times fewer
    training samples; the test windows are the same.
    """
    return role_windows(_roles(data_dir), name="shakespeare-disjoint", stride=SEQ_LEN + 1)


def _roles(data_dir: Path | None) -> dict[str, list[str]]:
    if data_dir is None:
        raise FedsimError(
            "dataset shakespeare needs data-dir: a folder with tinyshakespeare's input.txt "
            "or the plays in Markdown (<genre>/<play>.md)"
        )
    plays = sorted(p for p in data_dir.rglob("*.md") if not p.name.upper().startswith("README"))
    texts = sorted(data_dir.glob("*.txt"))
    stems = [p.stem for p in plays]
    if len(set(stems)) < len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise FedsimError(f"{data_dir}: two plays named {twice[0]}.md; roles are named by play")
    if plays:
        roles = _merge(parse_markdown_play(p) for p in plays)
    elif texts:
        roles = _merge(parse_plain_text(p) for p in texts)
    else:
        raise FedsimError(f"{data_dir}: no Shakespeare here; expected *.txt or **/*.md files")
    return roles


def _merge(parts: Iterable[list[tuple[str, str]]]) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for speeches in parts:
        for role, speech in speeches:
            roles.setdefault(role, []).append(speech)
    return roles


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FedsimError(f"{path}: cannot read as UTF-8 text ({exc})") from None


def parse_plain_text(path: Path) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of a ``NAME:`` plain-text file, empty speeches dropped."""
    speeches = []
    for block in re.split(r"\n\s*\n", _read(path)):
        lines = block.strip("\n").split("\n")
        if not lines[0].strip():
            continue
        head = PLAIN_SPEAKER.fullmatch(lines[0].strip())
        if head is None:
            raise FedsimError(
                f"{path}: paragraph starting {lines[0][:40]!r} has no 'NAME:' line; "
                "each speech must start with its speaker's name and a colon"
            )
        speech = SPACES.sub(" ", " ".join(lines[1:])).strip()
        if speech:
            speeches.append((head.group(1).strip(), speech))
    if not speeches:
        raise FedsimError(f"{path}: no speeches found; expected 'NAME:' lines before each")
    return speeches


def parse_markdown_play(path: Path) -> list[tuple[str, str]]:
    """(play/ROLE, speech) pairs of one Markdown play; stage directions are dropped."""
    speeches: list[tuple[str, str]] = []
    role: str | None = None
    lines: list[str] = []
    in_direction = False

    def flush() -> None:
        speech = SPACES.sub(" ", " ".join(lines)).strip()
        if role is not None and speech:
            speeches.append((f"{path.stem}/{role}", speech))
        lines.clear()

    for raw in _read(path).splitlines():
        line = raw.strip()
        speaker = MD_SPEAKER.fullmatch(line)
        if speaker or line.startswith("#"):  # also ends an unterminated stage direction
            flush()
            role = speaker.group(1).strip() if speaker else None
            in_direction = False
        elif in_direction:  # a stage direction over several lines ends with its _ or *
            in_direction = not line.endswith(("_", "*"))
        elif line.startswith(("_", "*")):
            in_direction = len(line) == 1 or not line.endswith(("_", "*"))
        else:
            text = MD_INLINE_DIRECTION.sub(" ", MD_ESCAPE.sub(r"\1", line))
            lines.append(MD_MARKUP.sub("", text))
    flush()
    if not speeches:
        raise FedsimError(f"{path}: no speeches found; expected a '**ROLE**' line before each")
    return speeches


def role_windows(roles: dict[str, list[str]], *, name: str, stride: int = 1) -> Dataset:
    """LEAF samples: each role's 80-character windows and next characters, split per role.

    ``stride``: a training window starts every ``stride`` characters (test windows start
    at every one); a character lies in up to ⌈81 / stride⌉ training windows.
    """
    users = tuple(sorted(roles))
    texts = ["\n".join(roles[user]) for user in users]
    cuts = [_split_point(len(text)) for text in texts]
    lookup = {c: i for i, c in enumerate(VOCAB)}
    train, test, owners = [], [], []
    for user_id, (text, cut) in enumerate(zip(texts, cuts, strict=True)):
        ids = token_array([lookup.get(c, UNK_ID) for c in text], len(VOCAB))
        windows = _windows(ids)  # (len - SEQ_LEN, SEQ_LEN + 1): context and target
        train.append(windows[: cut - SEQ_LEN : stride])
        test.append(windows[cut - SEQ_LEN :])
        owners.append(np.full(len(train[-1]), user_id, dtype=np.int64))
    train_w, test_w = np.concatenate(train), np.concatenate(test)
    test_w = test_w[_evenly_spaced(len(test_w), MAX_TEST)]
    if not len(train_w) or not len(test_w):
        raise FedsimError(f"{name}: too little text; no role speaks over {SEQ_LEN} characters")
    return Dataset(
        name,
        np.ascontiguousarray(train_w[:, :SEQ_LEN]),
        train_w[:, SEQ_LEN].astype(np.int64),
        np.ascontiguousarray(test_w[:, :SEQ_LEN]),
        test_w[:, SEQ_LEN].astype(np.int64),
        len(VOCAB),
        (SEQ_LEN,),
        NEXT_CHAR,
        client_ids=np.concatenate(owners),
        users=users,
        vocab=VOCAB,
        overlap=(-(-(SEQ_LEN + 1) // stride), "character"),  # as context or as the target
    )


def _windows(ids: np.ndarray) -> np.ndarray:
    if len(ids) <= SEQ_LEN:
        return np.zeros((0, SEQ_LEN + 1), dtype=ids.dtype)
    return np.lib.stride_tricks.sliding_window_view(ids, SEQ_LEN + 1)


def _split_point(length: int) -> int:
    """Index of the first held-out target character of a text of ``length`` characters.

    Windows whose target lies before it train; the others test. A role with fewer
    than 5 windows keeps them all for training.
    """
    windows = max(length - SEQ_LEN, 0)
    return SEQ_LEN + windows - int(windows * TEST_FRACTION)


def _evenly_spaced(n: int, cap: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))
