"""Shakespeare by speaking role (LEAF): both source formats, the windows and the hold-out."""

import numpy as np
import pytest

from fedsim.data import UNK_ID, load_dataset
from fedsim.data.shakespeare import (
    MAX_TEST,
    SEQ_LEN,
    parse_markdown_play,
    parse_plain_text,
    role_windows,
)
from fedsim.errors import FedsimError

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ANNA and BEN, with
Attendants_

**ANNA**$
Good morrow, \\[Aside]_ sir_$
how fare you?

**BEN**$
_\\[Bowing]_$
*Sound a horn.*
Well.

_Exit_

**ANNA**$
Farewell.
""".replace("$\n", "  \n")  # Markdown hard line breaks


def test_markdown_play_roles_and_directions(tmp_path):
    path = tmp_path / "a-play.md"
    path.write_text(PLAY)
    assert parse_markdown_play(path) == [
        ("a-play/ANNA", "Good morrow, how fare you?"),
        ("a-play/BEN", "Well."),
        ("a-play/ANNA", "Farewell."),
    ]


def test_plain_text_speeches(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("First Citizen:\nSpeak,\nspeak.\n\nAll:\n\nAll:\nResolved.\n")
    assert parse_plain_text(path) == [("First Citizen", "Speak, speak."), ("All", "Resolved.")]
    path.write_text("First Citizen:\nSpeak.\n\nno speaker here\nat all\n")
    with pytest.raises(FedsimError, match=r"input.txt: paragraph starting 'no speaker here'"):
        parse_plain_text(path)


def test_markdown_without_speakers_names_the_file(tmp_path):
    (tmp_path / "comedies").mkdir()
    (tmp_path / "comedies" / "empty.md").write_text("# Title\n\n_Enter nobody_\n")
    with pytest.raises(FedsimError, match=r"empty.md: no speeches found"):
        load_dataset("shakespeare", tmp_path)
    (tmp_path / "comedies" / "empty.md").write_text(PLAY)
    (tmp_path / "empty.md").write_text(PLAY)
    with pytest.raises(FedsimError, match=r"two plays named empty\.md"):
        load_dataset("shakespeare", tmp_path)
    (tmp_path / "empty.md").unlink()
    (tmp_path / "comedies" / "empty.md").unlink()
    with pytest.raises(FedsimError, match="no Shakespeare here"):
        load_dataset("shakespeare", tmp_path)


def test_windows_hold_out_the_end_of_each_role():
    text_a = "".join(chr(97 + i % 26) for i in range(200))  # 120 windows: 96 train, 24 test
    text_b = "xy" * 45  # 10 windows: 8 train, 2 test
    ds = role_windows({"A": [text_a], "B": [text_b], "C": ["too short"]}, name="t")
    assert ds.users == ("A", "B", "C") and ds.vocab[:2] == ("<pad>", "<unk>")
    assert np.bincount(ds.client_ids).tolist() == [96, 8]
    assert (len(ds.y_train), len(ds.y_test)) == (104, 26)
    decode = "".join
    first = decode(ds.vocab[i] for i in ds.x_train[0])
    assert first == text_a[:SEQ_LEN] and ds.vocab[ds.y_train[0]] == text_a[SEQ_LEN]
    # the first test window of A predicts the character after A's last training target
    assert decode(ds.vocab[i] for i in ds.x_test[0]) == text_a[96 : 96 + SEQ_LEN]
    assert ds.vocab[ds.y_test[0]] == text_a[96 + SEQ_LEN]
    with pytest.raises(FedsimError, match="too little text"):
        role_windows({"C": ["short"]}, name="t")


def test_one_character_changes_as_many_training_windows_as_the_dataset_declares():
    """The overlap the run's character guarantee counts, measured: change one character
    and count the training samples (window and target) that change."""
    text = "".join(chr(97 + (i * 7) % 26) for i in range(500))
    base = role_windows({"A": [text]}, name="t")
    changed = []
    for p in range(0, 300, 7):
        edited = role_windows({"A": [text[:p] + "Q" + text[p + 1 :]]}, name="t")
        rows = np.column_stack([base.x_train, base.y_train])
        other = np.column_stack([edited.x_train, edited.y_train])
        changed.append(int((rows != other).any(axis=1).sum()))
    assert base.overlap == (SEQ_LEN + 1, "character") and max(changed) == SEQ_LEN + 1
    # windows that share no character: a character changes one training sample
    disjoint = role_windows({"A": [text]}, name="t", stride=SEQ_LEN + 1)
    for p in range(0, 300, 7):
        edited = role_windows({"A": [text[:p] + "Q" + text[p + 1 :]]}, name="t", stride=81)
        rows = np.column_stack([disjoint.x_train, disjoint.y_train])
        other = np.column_stack([edited.x_train, edited.y_train])
        assert (rows != other).any(axis=1).sum() <= 1
    assert disjoint.overlap == (1, "character") and len(disjoint.y_train) == -(
        -len(base.y_train) // 81
    )
    assert np.array_equal(disjoint.x_test, base.x_test)


def test_the_alphabet_does_not_depend_on_the_text():
    # one role's rare characters must change neither vocab.json nor the model's shape
    plain = "To be, or not to be: that is the question." * 3
    ds_a = role_windows({"A": [plain], "B": [plain + " Zß—"]}, name="t")
    ds_b = role_windows({"A": [plain], "B": [plain + " abc"]}, name="t")
    assert ds_a.vocab == ds_b.vocab and ds_a.num_classes == len(ds_a.vocab) == 98
    assert np.array_equal(ds_a.x_train[:10], ds_b.x_train[:10])
    assert ds_a.x_test.max() < 98 and UNK_ID in ds_a.x_test[-1]  # ß and — are unknown


def test_tinyshakespeare_by_speaker(shared_data):
    ds = load_dataset("shakespeare", shared_data / "tinyshakespeare")
    assert len(ds.users) == 299 and ds.task == "next-char" and ds.input_shape == (SEQ_LEN,)
    assert ds.x_train.dtype == np.uint8 and ds.num_classes == len(ds.vocab) == 98
    assert len(ds.client_ids) == len(ds.y_train) > 800_000
    assert "\n" in ds.vocab and ds.users.index("First Citizen") >= 0


def test_plays_by_play_and_role(shared_data):
    folder = shared_data / "shakespeare-plays"
    speeches = [s for p in sorted(folder.rglob("*.md")) for s in parse_markdown_play(p)]
    assert len(speeches) == 31354 and len({role for role, _ in speeches}) == 1426
    assert not any(c in text for _, text in speeches for c in "_*[]\\")
    ds = load_dataset("shakespeare", folder / "tragedies")
    assert "hamlet/HAMLET" in ds.users and all(u.count("/") == 1 for u in ds.users)
    assert len(ds.y_test) == MAX_TEST  # capped, spread over all roles
    hamlet = ds.users.index("hamlet/HAMLET")
    assert np.count_nonzero(ds.client_ids == hamlet) > 40_000
