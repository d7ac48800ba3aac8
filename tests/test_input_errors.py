"""User errors in configs, data files and result files end as one FedsimError line (issue 16).

Each bad input must name the file or key, say what is wrong and how to fix it; none may
end as a traceback. Everything here is synthetic and fast: no Ray, no simulation.
"""

import _codecs
import contextlib
import io
import json
import pickle

import numpy as np
import pytest

from fedsim.config import FedsimConfig, load_config, parse_config
from fedsim.data import load_dataset
from fedsim.dp import solve
from fedsim.errors import FedsimError
from fedsim.results import load_run
from tests.test_data import fake_mnist, write_idx
from tests.test_images import write_batches
from tests.test_report import fake_run


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# 1. config values have their key's type ----------------------------------------------


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"num-rounds": True}, "num-rounds: expected a whole number, got true (a boolean)"),
        ({"num-rounds": "3"}, 'num-rounds: expected a whole number, got "3" (a string)'),
        ({"num-rounds": 3.0}, "num-rounds: expected a whole number, got 3.0 (a number)"),
        ({"lr": True}, "lr: expected a number, got true (a boolean)"),
        ({"lr": "0.1"}, 'lr: expected a number, got "0.1" (a string)'),
        ({"secure-noise": 1}, "secure-noise: expected true or false, got 1"),
        ({"secure-noise": "true"}, 'secure-noise: expected true or false, got "true"'),
        ({"name": 5}, "name: expected a string, got 5 (a whole number)"),
        ({"data-dir": 1.5}, "data-dir: expected a string, got 1.5 (a number)"),
        ({"num-rounds": {"a": 1}}, "num-rounds: expected a whole number"),
    ],
)
def test_config_values_are_strictly_typed(values, needle):
    with pytest.raises(FedsimError) as info:
        parse_config(values)
    assert needle in one_line(info)


def test_every_config_entry_point_is_strict(tmp_path):
    from flwr.app import RecordDict
    from flwr.common.config import parse_config_args
    from flwr.common.serde import config_record_from_proto, config_record_to_proto

    from fedsim.messages import CONFIG, decode_config, encode_config

    flat = tmp_path / "flat.toml"
    flat.write_text("target-epsilon = 8\ndelta = 1e-05\nlr = 1\nnum-rounds = 2\n")
    good = load_config(flat)  # an int stands for a float
    assert (good.target_epsilon, good.delta, good.lr, good.num_rounds) == (8.0, 1e-5, 1.0, 2)
    assert load_config(None, ["target-epsilon=8 num-rounds=2"]).target_epsilon == 8.0
    assert parse_config(parse_config_args(["target-epsilon=8 delta=1e-05"])).delta == 1e-5
    assert parse_config(good.to_flat()) == good
    # the server -> client record, through the wire format
    proto = config_record_to_proto(encode_config(good)[CONFIG])
    assert decode_config(RecordDict({CONFIG: config_record_from_proto(proto)}))[0] == good

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.flwr.app.config]\nnum-rounds = true\n")
    flat.write_text("num-rounds = true\n")
    for attempt in (
        lambda: load_config(flat),
        lambda: load_config(pyproject),
        lambda: load_config(None, ["num-rounds=true"]),
        lambda: parse_config(parse_config_args(["num-rounds=true"])),
    ):
        with pytest.raises(FedsimError) as info:
            attempt()
        assert "num-rounds: expected a whole number, got true (a boolean)" in one_line(info)


def test_numpy_scalars_stay_plain_numbers():
    cfg = parse_config({"seed": np.int64(3), "lr": np.float32(0.5), "secure-noise": np.bool_(1)})
    assert (cfg.seed, cfg.lr, cfg.secure_noise) == (3, 0.5, True)
    assert type(cfg.seed) is int and type(cfg.secure_noise) is bool
    with pytest.raises(FedsimError) as info:
        parse_config({"num-rounds": np.bool_(True)})
    assert "num-rounds: expected a whole number" in one_line(info)


# 2. whole numbers fit what uses them ------------------------------------------------


@pytest.mark.parametrize("key", ["seed", "num-rounds", "max-samples"])
def test_huge_whole_numbers_are_refused(key):
    with pytest.raises(FedsimError) as info:
        parse_config({key: 10**23})
    assert f"config: {key}: " in one_line(info) and "2**63" in str(info.value)
    parse_config({"seed": 2**63 - 1})


def test_accountant_that_cannot_count_the_steps_says_so():
    with pytest.raises(FedsimError) as info:
        solve.solve_noise_multiplier(
            target_epsilon=8.0, delta=1e-5, accountant="pld", schedules=[(0.01, 2**62)]
        )
    assert "accountant pld" in one_line(info) and "rdp" in str(info.value)


# 3. a config file's layout -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tool = 5\n", "unknown key 'tool'"),
        ("[tool]\nflwr = 5\n", "unknown key 'tool'"),
        ("[tool.flwr]\napp = [1, 2]\n", "unknown key 'tool'"),
        ("[tool.flwr.app]\nconfig = 5\n", "tool.flwr.app.config is 5, not a table"),
    ],
)
def test_config_file_layout_errors(tmp_path, text, needle):
    path = tmp_path / "odd.toml"
    path.write_text(text)
    with pytest.raises(FedsimError) as info:
        load_config(path)
    assert needle in one_line(info)


# 4. IDX files ------------------------------------------------------------------------


def test_idx_header_larger_than_the_file(tmp_path):
    fake_mnist(tmp_path)
    header = bytes([0, 0, 8, 3]) + b"".join((2**31).to_bytes(4, "big") for _ in range(3))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header)
    with pytest.raises(FedsimError) as info:
        load_dataset("mnist", tmp_path)
    message = one_line(info)
    assert "train-images-idx3-ubyte: header says" in message and "holds 0" in message


def test_mnist_images_must_be_28x28(tmp_path):
    fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((20, 1, 1)))
    with pytest.raises(FedsimError) as info:
        load_dataset("fashion-mnist", tmp_path)
    message = one_line(info)
    assert "t10k-images-idx3-ubyte: images are 1×1" in message and "28×28" in message


def test_cifar_folder_images_must_be_32x32(tmp_path):
    from PIL import Image

    for split, size in (("train", 32), ("test", 1)):
        for label in range(10):
            (tmp_path / split / f"class{label}").mkdir(parents=True)
            Image.new("RGB", (size, size)).save(tmp_path / split / f"class{label}" / "0.png")
    with pytest.raises(FedsimError) as info:
        load_dataset("cifar10", tmp_path)
    message = one_line(info)
    assert f"{tmp_path / 'test'}: images are 1×1" in message and "32×32" in message


# 5. CIFAR-10 pickles written by Python 3 with protocol 2 -----------------------------


def write_protocol2_batches(folder, n=4):
    write_batches(folder, n=n)
    for path in folder.iterdir():
        batch = pickle.loads(path.read_bytes())
        path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar_protocol2_pickles_load(tmp_path):
    write_protocol2_batches(tmp_path)
    assert b"_codecs" in (tmp_path / "test_batch").read_bytes()
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.y_test.shape == (4,)
    raw = pickle.loads((tmp_path / "test_batch").read_bytes())[b"data"][0]
    assert np.allclose(ds.x_test[0, 0], (raw[:1024].reshape(32, 32) / 255 - 0.4914) / 0.2470)


class _Encode:
    """Pickles as a call of ``_codecs.encode(*args)``."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return _codecs.encode, self.args


@pytest.mark.parametrize(
    "args", [("x", "utf-16"), ("x", "rot13"), (5, "latin1"), (["x"], "latin1"), ("x",)]
)
def test_cifar_codecs_encode_only_for_latin1_text(tmp_path, args):
    write_protocol2_batches(tmp_path)
    batch = {b"data": _Encode(*args), b"labels": [0]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(FedsimError) as info:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_2: not a CIFAR-10 batch pickle" in one_line(info)


# 6. result files ---------------------------------------------------------------------


def rounds_text(run):
    return (run / "rounds.csv").read_text()


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda text: text[:-20], "rounds.csv row 2 has 4 of the 12 columns (truncated?)"),
        (lambda text: text + "2,0.9,0.2,1.5,1.0,2,0,,,1.5,,,7\n", "row 3 has more than 12"),
        (lambda text: text.replace(",loss,", ",lss,", 1), "rounds.csv has no column loss"),
        (lambda text: text.replace("0.3,", "abc,", 1), "rounds.csv row 2: loss is 'abc'"),
        (lambda text: text.replace("1,0.8", "1.5,0.8", 1), "row 2: round is '1.5', not a whole"),
        (lambda text: "\udcff\udcfe" + text, "rounds.csv is not a CSV file"),
    ],
)
def test_bad_rounds_csv_names_the_file(tmp_path, damage, needle):
    run = tmp_path / "run"
    fake_run(run, eps=1.0, acc=0.8, seed=0)
    (run / "rounds.csv").write_text(damage(rounds_text(run)), errors="surrogateescape")
    with pytest.raises(FedsimError) as info:
        load_run(run)
    message = one_line(info)
    assert needle in message and "rerun or restore" in message


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda text: text[: len(text) // 2], "summary.json is not valid JSON (truncated?)"),
        (lambda text: "[]", "summary.json holds a list, not a JSON object"),
        (lambda text: json.dumps({"accuracy": 0.5}), "summary.json lacks privacy_unit"),
        (
            lambda text: text.replace('"accuracy": 0.8', '"accuracy": "high"'),
            "summary.json: accuracy is 'high', not a number",
        ),
    ],
)
def test_bad_summary_names_the_file(tmp_path, damage, needle):
    run = tmp_path / "run"
    fake_run(run, eps=1.0, acc=0.8, seed=0)
    summary = run / "summary.json"
    summary.write_text(damage(summary.read_text()))
    with pytest.raises(FedsimError) as info:
        load_run(run)
    message = one_line(info)
    assert needle in message and "rerun or restore" in message


@pytest.mark.parametrize("name", ["summary.json", "rounds.csv"])
def test_report_command_gives_one_line(tmp_path, name):
    from fedsim.experiments.cli import main

    run = tmp_path / "run"
    fake_run(run, eps=1.0, acc=0.8, seed=0)
    path = run / name
    path.write_text(path.read_text()[:-30] if name == "rounds.csv" else "{}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["report", str(run)])
    assert code == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: ") and name in lines[0]


def test_parse_config_still_takes_its_own_output():
    cfg = FedsimConfig(seed=2**63 - 1, delta=1e-5, target_epsilon=8)
    assert parse_config(cfg.to_flat()) == cfg
    with pytest.raises(FedsimError) as info:
        parse_config(cfg.to_flat() | {"seed": True})
    assert "seed: expected a whole number, got true (a boolean)" in one_line(info)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"model": "cnn\nfedavg-cnn"}, r"unknown model 'cnn\nfedavg-cnn'"),
        ({"data-dir": "/tmp/a\rb", "dataset": "mnist"}, r"data-dir /tmp/a\rb is not a folder"),
    ],
)
def test_line_breaks_in_values_stay_on_one_line(values, needle):
    # found by Hypothesis (tests/test_properties.py): a quoted value broke the one line
    with pytest.raises(FedsimError) as caught:
        load_dataset("mnist", parse_config(values).data_dir)
    assert "\n" not in str(caught.value) and "\r" not in str(caught.value)
    assert needle in str(caught.value)
