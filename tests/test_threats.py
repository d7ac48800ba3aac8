"""Privacy against the parties the docs do not trust: one group of tests per finding.

1. noise derivable from the seed; 2. streams that collide; 3. published cohorts under
user-level DP; 4. σ solved for a schedule other than the one run; 5. unnoised releases
and the replace-one claim; 6. one per-sample loss in every clipping mode; 7. a summary
key that reads like an ε but holds a client id.
"""

import copy
import io
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from opacus import GradSampleModule, PrivacyEngine
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

from experiments.research import cohort_sizes
from fedsim import results
from fedsim.clients import client_app, local
from fedsim.clients.task import client_info
from fedsim.clients.training import train_local
from fedsim.config import check_deployment, deploy_config, parse_config
from fedsim.dp import accounting, solve
from fedsim.dp.fast_clip import FastClipper, per_sample_cross_entropy
from fedsim.dp.private import make_private
from fedsim.dp.randomness import (
    Purpose,
    dp_randomness,
    numpy_generator,
    secure_dp_randomness,
    seeded_root,
    stream_seed,
    torch_generator,
)
from fedsim.dp.schedule import poisson_schedule
from fedsim.errors import FedsimError
from fedsim.experiments import sweep, watch
from fedsim.experiments.progress import LiveProgress, SweepProgress, round_line
from fedsim.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    PARTITION_KEY,
    ROUND_KEY,
    ClientInfo,
    PrivacySpent,
    TrainReport,
    decode_client_info,
    dropout_reason,
    encode_client_info,
    encode_train_reply,
)
from fedsim.models import build_model
from fedsim.results.report import summary_line
from fedsim.server import federation, guarantees, outputs, privacy
from fedsim.server.rounds import screen_replies
from fedsim.server.state import RunState, load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off")
DELTA = 1e-5
TRAINING = {"per_sample": "fast", "device": "cpu"}  # how write_final says clients trained


# 1. Noise that the adversary cannot know -------------------------------------------


def noise_only_update(randomness, labels):
    """DP-SGD on inputs of zeros: every weight gradient is 0, so the update is the noise.

    10 steps of expected batch 10, σ = 2, C = 1, lr 1: each weight moves by a sum of 10
    draws of N(0, (σC/10)²), std 2·√10/10 per coordinate.
    """
    model = nn.Linear(256, 256, bias=False)
    nn.init.zeros_(model.weight)
    x = np.zeros((100, 256), np.float32)
    train_local(model, x, labels, epochs=1, batch_size=10, lr=1.0, noise_multiplier=2.0,
                max_grad_norm=1.0, randomness=randomness)  # fmt: skip
    return model.weight.detach().flatten()


NOISE_STD = 2 * math.sqrt(10) / 10
LABELS = np.arange(100) % 256


def seeded(seed=0, server_round=1, client=2):
    root = seeded_root(seed)
    return dp_randomness(root, server_round=server_round, client=client, device="cpu",
                         secure=False)  # fmt: skip


def test_seeded_noise_is_a_function_of_the_seed_alone():
    # what the auditor found: other data, same seed -> the very same noise, removable
    real, fake = (
        noise_only_update(seeded(), LABELS),
        noise_only_update(seeded(), LABELS[::-1].copy()),
    )
    assert torch.equal(real, fake)
    other = noise_only_update(seeded(client=3), LABELS)
    assert abs(np.corrcoef(real, other)[0, 1]) < 0.02


def test_secure_noise_is_fresh_independent_and_of_the_right_size():
    first, second = (noise_only_update(secure_dp_randomness(), LABELS) for _ in range(2))
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.02  # 65,536 pairs: 5 standard errors
    for update in (first, second):
        assert float(update.std()) == pytest.approx(NOISE_STD, rel=0.02)
        assert abs(float(update.mean())) < 0.02


def test_a_client_with_secure_noise_trains_differently_each_time():
    state = build_model("cnn", input_shape=(1, 8, 8), num_classes=10).state_dict()
    for secure in (False, True):
        config = parse_config({"num-rounds": 2, "noise-multiplier": 1.0, "secure-noise": secure})
        a = local.train_round(config, 2, 1, state)[0]
        b = local.train_round(config, 2, 1, state)[0]
        assert all(torch.equal(a[k], b[k]) for k in a) is not secure


def test_simulated_faults_are_drawn_as_the_noise_is():
    """With secure noise nobody can name the stragglers from the published seed: a round's
    time would otherwise show that one was sampled, under secret cohorts."""
    faults = {"client-dropout": 0.5, "straggler-prob": 0.5}
    for secure in (False, True):
        config = parse_config({**faults, "secure-noise": secure})
        draws = [[local.fault_draws(config, c, r) for c in range(32)] for r in (1, 2)]
        again = [[local.fault_draws(config, c, r) for c in range(32)] for r in (1, 2)]
        assert (draws == again) is not secure  # 64 pairs of fair coins: 2^-128 by chance
        assert draws[0] != draws[1]  # each round draws anew


def test_deployment_refuses_seeded_noise_at_every_door():
    with pytest.raises(FedsimError, match="secure-noise = false is refused"):
        check_deployment(parse_config({"secure-noise": False}))
    assert deploy_config({}, 2).secure_noise  # on unless given
    with pytest.raises(FedsimError, match="secure-noise = false is refused"):
        deploy_config({"secure-noise": False}, 2)
    # a SuperNode refuses a seeded config even if a server sends one
    config = parse_config({"num-clients": 2, "clients-per-round": 2, "noise-multiplier": 1.0})
    msg = train_message(config, client=0)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})  # fmt: skip
    with pytest.raises(FedsimError, match="secure-noise = false is refused"):
        client_app.train(msg, context, deployment=True)
    secure = config.model_copy(update={"secure_noise": True})
    reply = client_app.train(train_message(secure, client=0), context, deployment=True)
    assert set(reply.content[METRICS]) == {PARTITION_KEY, "num-examples"}


@pytest.mark.parametrize("dp", ["sample", "none"])
def test_a_node_s_data_error_reaches_the_server_without_its_values(dp, monkeypatch):
    """Flower sends the server an exception's text; under sample-level DP it is not
    trusted with one that can quote the node's data."""
    values = {"num-clients": 2, "clients-per-round": 2, "dp": dp, "secure-noise": True}
    config = parse_config({**values, "noise-multiplier": 1.0} if dp == "sample" else values)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})  # fmt: skip
    quoted = "dataset 'mine': y_train has labels 7..12, outside 0..9"

    def fails(*args, **kwargs):
        raise FedsimError(quoted)

    monkeypatch.setattr(client_app, "client_info", fails)
    monkeypatch.setattr(client_app, "train_round", fails)
    query = train_message(config, client=0)
    for call in (client_app.query, client_app.train):
        with pytest.raises(FedsimError) as caught:
            call(query, context, deployment=True)
        if dp == "sample":
            assert "7..12" not in str(caught.value) and "FedsimError" in str(caught.value)
            assert str(caught.value.__cause__) == quoted  # for the node's own log
        else:  # no sample-level DP: the server may read it, and it helps
            assert str(caught.value) == quoted


@pytest.mark.parametrize("dp", ["sample", "none", "user"])
def test_a_client_s_error_text_stays_out_of_the_published_rounds(dp):
    """In a simulation the readers of the results are not trusted under sample-level DP,
    and a client's error can quote its data: ``rounds.csv`` names the client only."""
    values = {"num-clients": 4, "clients-per-round": 4, "dp": dp, "client-dropout": 0.5}
    config = parse_config({**values, "noise-multiplier": 1.0, "user-noise-multiplier": 1.0})
    sent = [make_message(Metadata(1, f"m-{c}", 1, 10 + c, "", "", time.time(), 60.0,
                                  MessageType.TRAIN),
                         content=RecordDict({CONFIG: ConfigRecord({PARTITION_KEY: c})}))
            for c in range(4)]  # fmt: skip
    quoted = "<class 'ValueError'>:<'label 12 outside 0..9'>"
    raised = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    replies = [
        Message(Error(raised, quoted), reply_to=sent[0]),
        Message(Error(raised, dropout_reason(0.5)), reply_to=sent[1]),
        create_message_error_unavailable_res_message(sent[2].metadata, "node_unavail"),
    ]  # client 3: no reply
    _, dropped = screen_replies(sent, replies, timeout=5)
    state = RunState(config, [ClientInfo(c, 50, None) for c in range(4)])
    row, private = outputs.round_rows(state, 1, 0.5, 0.5, cohort=[0, 1, 2, 3], dropped=dropped,
                                      clip_norm=None, seconds=1.0)  # fmt: skip
    assert "0: error: label 12 outside 0..9" in private["dropped"]  # for the operator
    if dp == "user":
        assert row.dropped == ""
        return
    for kept in ("1: dropped out (simulated", "2: Error: Node Unavailable", "3: no reply"):
        assert kept in row.dropped
    assert ("label 12" in row.dropped) == (dp == "none")
    assert ("0: error: withheld" in row.dropped) == (dp == "sample")


def train_message(config, *, client):
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    meta = Metadata(1, "m-1", 1, 5, "", "", time.time(), 60.0, MessageType.TRAIN)
    values = {**config.to_flat(), ROUND_KEY: 1, PARTITION_KEY: client}
    content = RecordDict({ARRAYS: ArrayRecord(model.state_dict()), CONFIG: ConfigRecord(values)})
    return make_message(meta, content=content)


# 2. Independent randomness streams --------------------------------------------------


def test_a_million_keys_get_a_million_distinct_streams():
    root = seeded_root(0)
    seeds = {
        stream_seed(root, purpose=purpose, server_round=r, client=c)
        for purpose in (Purpose.BATCHES, Purpose.SGD_NOISE)
        for r in range(1, 1001)
        for c in range(500)
    }
    assert len(seeds) == 1_000_000


def test_the_auditors_colliding_pair_now_draws_different_noise():
    # with seed 0 the old 32-bit seeds of (round 14, client 962) and (79, 686) were equal
    a, b = seeded(0, 14, 962), seeded(0, 79, 686)
    assert not torch.equal(
        torch.randn(1000, generator=a.noise), torch.randn(1000, generator=b.noise)
    )
    assert not torch.equal(
        torch.rand(1000, generator=a.batches), torch.rand(1000, generator=b.batches)
    )


def test_generators_use_the_whole_stream_seed():
    seed = stream_seed(seeded_root(0), purpose=Purpose.SGD_NOISE, server_round=1)
    twin = seed[:8] + bytes(b ^ 0xFF for b in seed[8:])  # same first 64 bits, as a seed
    draws = [torch.randn(64, generator=torch_generator(s)) for s in (seed, twin)]
    assert not torch.equal(*draws)  # torch's own manual_seed would keep only 32 bits
    assert torch.equal(draws[0], torch.randn(64, generator=torch_generator(seed)))
    assert numpy_generator(seed).random() != numpy_generator(twin).random()
    firsts = {
        torch.randint(0, 2**62, (2,), generator=torch_generator(
            stream_seed(seeded_root(1), purpose=Purpose.BATCHES, server_round=r, client=c)
        )).tolist().__repr__()
        for r in range(40) for c in range(50)
    }  # fmt: skip
    assert len(firsts) == 2000


# 3. Who trained when stays private under user-level DP ------------------------------


def user_state(dp, cohorts, reports=None):
    """A finished 3-round run of 10 clients of 50 examples, with the given cohorts."""
    config = parse_config(
        {"dp": dp, "num-clients": 10, "clients-per-round": 3, "num-rounds": len(cohorts),
         "noise-multiplier": 1.1, "user-noise-multiplier": 1.3}
    )  # fmt: skip
    state = RunState(config, [ClientInfo(c, 50, None) for c in range(10)])
    for r, cohort in enumerate(cohorts, start=1):
        state.user_ledger.append(privacy.LedgerEntry(r, 1.3, 0.3, 1))
        for c in cohort:
            spent = (reports or {}).get((r, c), state.prescribed[c])
            privacy.record(state.ledger, c, r, spent)
    for r, cohort in enumerate([[], *cohorts]):
        row, private = outputs.round_rows(state, r, 0.5, 0.5, cohort=cohort,
                                          dropped={c: "dropped out" for c in cohort[:1]},
                                          clip_norm=None, seconds=10.0 * len(cohort))  # fmt: skip
        state.rows.append(row)
        state.participation.append(private)
    return state


COHORTS = [[1, 4, 7], [0, 4], [2, 4, 9]]


@pytest.mark.parametrize("dp", ["user", "both"])
def test_no_publishable_file_names_a_sampled_client(tmp_path, dp):
    state = user_state(dp, COHORTS)
    state.arrays = {}
    outputs.write_partition(tmp_path, state.infos, None)
    rows = [r.to_csv() for r in state.rows]
    results.write_csv(tmp_path / results.ROUNDS, rows, results.ROUND_FIELDS)
    summary = outputs.write_final(
        state, tmp_path, time.time(), engine="simulation", training=TRAINING
    )
    rounds = results.read_csv(tmp_path / results.ROUNDS)
    assert [r["clients"] for r in rounds] == [""] * 4 and [r["dropped"] for r in rounds] == [""] * 4
    # a cohort's size tells how likely one client was in it: it stays with the cohort
    assert [r["cohort"] for r in rounds] == [""] * 4
    # a failure can come from a client's data: the counts stay private too
    assert [r["failed"] for r in rounds] == [""] * 4 and summary["failed_per_round"] is None
    assert summary["wall_seconds"] is None  # a sum of round times still tells of the cohorts
    assert summary["client_with_max_epsilon"] is None
    ledger = json.loads((tmp_path / results.PRIVACY).read_text())
    for unit in ledger["units"].values():
        assert "clients" not in unit
    assert "participation" not in json.dumps(summary)
    private = results.read_csv(tmp_path / results.PARTICIPATION)
    assert [r["clients"] for r in private[1:]] == ["1 4 7", "0 4", "2 4 9"]
    assert [r["failed"] for r in private] == ["0", "1", "1", "1"]
    assert [r["cohort"] for r in private] == ["0", "3", "2", "3"]
    assert (tmp_path / results.PRIVATE_README).read_text().startswith("Do not publish")
    # a round's time tracks how much data its cohort held: it stays with the cohorts
    assert [r["seconds"] for r in rounds] == [""] * 4
    assert [float(r["seconds"]) for r in private] == [0.0, 30.0, 20.0, 30.0]
    assert results.round_seconds(tmp_path) == [0.0, 30.0, 20.0, 30.0]  # for their owner
    result = results.load_run(tmp_path)
    assert [(r.seconds, r.cohort) for r in result.rounds] == [(None, None)] * 4
    assert "30.00" not in results.report.round_table(result.rounds)
    assert "  s" not in round_line(result.rounds[1], 3) and "ε" in round_line(result.rounds[1], 3)
    assert "dropped" not in round_line(result.rounds[1], 3)  # 1 of 3 was, in private/


def test_a_published_cohort_size_would_raise_the_user_epsilon():
    """Why rounds.csv keeps no cohort size under user-level DP: given K, a client was
    sampled with chance K/N, not q (experiments/research/cohort_sizes.py)."""
    plain, published = cohort_sizes.rdp_epsilons(10, 0.3, 1.0, 30, DELTA)
    charged = accounting.history_epsilon([(1.0, 0.3, 30)], delta=DELTA, accountant="rdp")
    assert plain == pytest.approx(charged)  # without sizes: what fedsim reports
    assert published > 1.1 * plain
    # where everyone is sampled the size tells nothing, and the mixture must agree
    everyone, sized = cohort_sizes.rdp_epsilons(10, 1.0, 1.0, 30, DELTA)
    assert sized == pytest.approx(everyone) and everyone > published


@pytest.mark.parametrize("dp", ["sample", "user"])
def test_the_live_bar_counts_a_round_s_clients_only_where_cohorts_are_public(dp):
    config = user_state(dp, COHORTS).config
    live = LiveProgress(config, console=Console(file=io.StringIO(), force_terminal=True))
    live.reply(server_round=1, done=2, cohort=3)
    task = live.bar.tasks[live.clients]
    live.close()
    shown = (task.visible, task.completed, task.total)
    assert shown == ((True, 2, 3) if dp == "sample" else (False, 0, None))


@pytest.mark.parametrize("dp", ["sample", "user"])
def test_deploy_s_waiting_notes_do_not_time_rounds_under_private_cohorts(dp, monkeypatch):
    """Notes every 15 s between two round lines would measure the round in a log."""
    notes, clock = [], iter(range(0, 1000, 16))
    monkeypatch.setattr(watch.time, "monotonic", lambda: float(next(clock)))
    run = watch.RunWatch.__new__(watch.RunWatch)  # no federation: only the notes run
    run.config, run.printed = user_state(dp, COHORTS).config, 2
    run.since = run.said = -16.0
    run.said_private = False
    run.progress = SimpleNamespace(note=notes.append)
    for _ in range(5):
        run._say_what_it_waits_for()
    if dp == "user":
        assert len(notes) == 1 and "round 2" not in notes[0]
    else:
        assert len(notes) == 5 and all("round 2 of 3" in n for n in notes)


@pytest.mark.parametrize("dp", ["sample", "user"])
def test_deploy_says_nothing_mid_run_of_a_node_that_failed_under_private_cohorts(
    dp, tmp_path, capsys
):
    """A SuperNode's exit is a failure, and when it came tells of the cohorts."""
    (tmp_path / "supernode-1.log").write_text("Traceback ...\nValueError: bad data\n")
    run = watch.RunWatch.__new__(watch.RunWatch)  # no federation: only the node check runs
    run.config, run.gone = user_state(dp, COHORTS).config, set()
    dead = SimpleNamespace(poll=lambda: -9, returncode=-9)
    run.fed = SimpleNamespace(procs={"supernode-1": dead}, work=tmp_path)
    run._check_nodes(started=True)
    said = capsys.readouterr().out
    assert ("supernode-1 exited" in said) is (dp == "sample")
    assert run.gone == {"supernode-1"}


def test_a_round_reaches_rounds_csv_only_once_it_is_checkpointed(tmp_path, monkeypatch):
    """Killed between the two writes, a run resumes after the round: it never releases
    the round a second time, with fresh noise, beside a row of the first release."""
    state = user_state("sample", COHORTS)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(federation.results, "write_csv", killed)
    with pytest.raises(KeyboardInterrupt):
        federation.save_round(state, tmp_path, {"w": torch.zeros(2)}, {})
    saved = load_checkpoint(tmp_path)
    assert saved is not None and len(saved["rows"]) == len(state.rows)
    assert not (tmp_path / results.ROUNDS).exists()


def test_a_checkpoint_with_round_times_resumes_with_them_in_private(tmp_path):
    """Written before round times moved to private/: resumed, it republishes none."""
    state = user_state("user", COHORTS)
    state.arrays = {}
    data = state.to_checkpoint()
    for row, private in zip(data["rows"], data["participation"], strict=True):
        row["seconds"] = private.pop("seconds") + 1.0
        row["failed"] = private.pop("failed")  # and failure counts, public then
        row["cohort"] = private.pop("cohort")  # and cohort sizes, public until later
    restored = RunState.from_checkpoint(copy.deepcopy(data), state.infos)
    assert [(r.seconds, r.cohort, r.failed) for r in restored.rows] == [(None, None, None)] * 4
    assert [p["seconds"] for p in restored.participation] == [1.0, 31.0, 21.0, 31.0]
    assert [p["failed"] for p in restored.participation] == [0, 1, 1, 1]
    assert [p["cohort"] for p in restored.participation] == [0, 3, 2, 3]
    summary = outputs.write_final(restored, tmp_path, 0.0,
                                  engine="simulation", training=TRAINING)  # fmt: skip
    assert summary["wall_seconds"] is None  # even the rounds' sum tells of the cohorts
    private = results.read_csv(tmp_path / results.PARTICIPATION)
    assert sum(float(r["seconds"]) for r in private) == 84.0  # every round's, for the owner


def test_every_guarantee_says_where_label_counts_are_published():
    state = user_state("both", COHORTS)
    for share in (False, True):
        state.config = state.config.model_copy(update={"share_label_counts": share})
        for g in guarantees.guarantees(state, state.epsilons(), "simulation"):
            assert ("label counts are published" in g["relation"]) is share, g


def test_a_guarantee_says_where_the_partition_places_examples_by_label():
    """Dirichlet and shards partitions put an example where its label says, and each
    client's example count is published: the counts tell of labels."""
    state = user_state("both", COHORTS)
    for partition in ("iid", "dirichlet", "shards"):
        state.config = state.config.model_copy(update={"partition": partition})
        for g in guarantees.guarantees(state, state.epsilons(), "simulation"):
            told = "counts tell of the labels" in g["relation"]
            assert told is (partition != "iid" and g["unit"] != "user"), g


@pytest.mark.parametrize("dp", ["sample", "both"])
def test_a_character_in_many_windows_gets_its_own_guarantee(dp):
    """One Shakespeare character lies in up to 81 training windows: the sample ε says
    little of it, and the run names the character's own ε (or says it has none)."""
    state = user_state(dp, COHORTS)
    state.config = state.config.model_copy(update={"partition": "natural"})
    found = guarantees.guarantees(state, state.epsilons(), "simulation", (81, "character"))
    sample = next(g for g in found if g["unit"] == "sample" and not g["implied_by"])
    character = next(g for g in found if g["unit"] == "character")
    assert "protects a sample, not a character" in sample["relation"]
    assert character["implied_by"] == "sample" and character["accountant"] == "pld-group-81"
    # what is computed is zeroing the samples out; a changed character is not claimed
    assert character["relation"].startswith("zero out every training sample that holds one")
    assert "changing the character's value replaces those samples" in character["relation"]
    assert character["epsilon"] == pytest.approx(state.sample_epsilon(accountant="pld-group-81"))
    assert character["epsilon"] > 5 * sample["epsilon"]
    line = summary_line({"privacy_unit": "sample", "noise_multiplier": 1.1, "accuracy": 0.5,
                         "epsilon_by_unit": {"sample": sample["epsilon"]}, "delta": DELTA,
                         "accountant": "rdp", "guarantees": found, "noise": {"kind": "secure"},
                         "config": {"seed": 0}})  # fmt: skip
    assert "for one character's samples zeroed out (pld-group-81)" in line
    # other partitions spread a text's windows over clients: no bound, and it says so
    state.config = state.config.model_copy(update={"partition": "iid"})
    found = guarantees.guarantees(state, state.epsilons(), "simulation", (81, "character"))
    character = next(g for g in found if g["unit"] == "character")
    assert character["epsilon"] is None and "spreads over clients" in character["relation"]
    # windows that share no character: changing one replaces one sample
    found = guarantees.guarantees(state, state.epsilons(), "simulation", (1, "character"))
    character = next(g for g in found if g["unit"] == "character")
    assert character["accountant"] == "pld-replace-one"
    assert character["epsilon"] == pytest.approx(state.sample_epsilon(accountant="pld-replace-one"))
    # a count taken from the training data would publish it (SST-2's phrases): none
    found = guarantees.guarantees(state, state.epsilons(), "simulation", (0, "word"))
    word = next(g for g in found if g["unit"] == "word")
    assert word["epsilon"] is None and "depends on the training data" in word["relation"]
    assert "lies in several samples" in found[0]["relation"]
    # samples that share nothing: no such guarantee
    plain = guarantees.guarantees(state, state.epsilons(), "simulation")
    assert all(g["unit"] != "character" for g in plain)


def test_published_sample_epsilon_under_secret_cohorts_reveals_no_cohort():
    busy = user_state("both", COHORTS)  # client 4 trained in every round
    idle = user_state("both", [[1], [2], [3]])  # nobody trained twice
    assert busy.epsilons() == idle.epsilons()  # the published ε cannot tell them apart
    every_round = [(1.1, 1.0, 3)]  # 50 examples, batch 64: q = 1, one step a round
    want = accounting.history_epsilon(every_round, delta=DELTA, accountant="rdp")
    assert busy.epsilons()["sample"] == pytest.approx(want)
    assert busy.epsilons(public=False)["sample"] == pytest.approx(want)  # client 4
    assert idle.epsilons(public=False)["sample"] < want
    # a client that reports a costlier spend than prescribed is still counted in full
    costly = PrivacySpent((0.5,), (1.0,), (1,))
    odd = user_state("both", [[1], [2], [3]], reports={(2, 2): costly})
    assert odd.epsilons()["sample"] > want


# 4. One schedule for the solver, the loader and the ledger --------------------------


def test_every_batch_count_runs_and_records_the_schedule_the_solver_assumes():
    for k in range(1, 1001):
        n = 10 * k - k % 7  # ⌈n / 10⌉ = k
        schedule = poisson_schedule(n, batch_size=10, epochs=1)
        assert (schedule.batches, schedule.sample_rate) == (k, 1.0 / k)
        model, engine = nn.Linear(1, 2), PrivacyEngine(accountant="rdp")
        data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
        private = make_private(
            engine, grad_sample="fast", module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=data,
            schedule=schedule, noise_multiplier=1.0, max_grad_norm=1.0,
            randomness=seeded(client=k),
        )  # fmt: skip
        assert len(private.data_loader) == k, k  # Opacus alone: int(1 / q), k - 1 for 93
        assert private.data_loader.batch_sampler.sample_rate == schedule.sample_rate
        assert private.optimizer.expected_batch_size == n / k  # Opacus: int(n · q)
        xb, yb = next(iter(private.data_loader))
        private.criterion(model(xb), yb).backward()
        private.optimizer.step()
        private.close()
        # what the ledger records per step is the solver's (σ, q)
        spend = privacy.prescribed_spend(n, noise_multiplier=1.0, batch_size=10, epochs=1)
        assert engine.accountant.history == [(1.0, spend.sample_rate[0], 1)]
        assert spend.steps == (k,)


@pytest.mark.parametrize("grad_sample", ["fast", "hooks", "ghost"])
def test_batch_size_one_trains_for_every_client_size(grad_sample):
    # Opacus's int(n · q) is 0 at n = 49, 98, 103, ...: the update was divided by zero
    for n in (49, 98, 103):
        assert poisson_schedule(n, batch_size=1, epochs=1).expected_batch == 1.0
        torch.manual_seed(n)
        model = nn.Linear(3, 2)
        x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
        loss, spent = train_local(
            model, x, y, epochs=1, batch_size=1, lr=0.1, noise_multiplier=1.0,
            grad_sample=grad_sample, randomness=seeded(client=n),
        )  # fmt: skip
        assert math.isfinite(loss) and spent.steps == (n,)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("k", "accountant"),
    [(93, "rdp"), (93, "prv"), (93, "pld"), (99, "rdp"), (186, "rdp"), (1000, "rdp")],
)
def test_a_client_training_every_round_ends_within_its_target(k, accountant):
    # the acceptance run: 930 examples, batch 10, 30 rounds, target 8 (was 8.04)
    n, rounds = 10 * k, 30
    spend = privacy.prescribed_spend(n, noise_multiplier=1.0, batch_size=10, epochs=1)
    sigma = solve.solve_noise_multiplier(
        target_epsilon=8.0, delta=DELTA, accountant=accountant,
        schedules=[(spend.sample_rate[0], spend.steps[0] * rounds)],
    )  # fmt: skip
    ledger: privacy.Ledger = {}
    for r in range(1, rounds + 1):  # what each round's loader records (test above)
        privacy.record(ledger, 0, r, PrivacySpent((sigma,), spend.sample_rate, spend.steps))
    eps = privacy.run_epsilon(ledger, delta=DELTA, accountant=accountant)[0]
    assert 7.7 < eps <= 8.0


# 5. Releases ------------------------------------------------------------------------


def test_clients_send_label_counts_only_when_the_run_allows_it():
    private = parse_config({})
    info = client_info(private, 0)
    assert info.label_counts is None
    assert "label-counts" not in encode_client_info(info)[METRICS]
    assert decode_client_info(encode_client_info(info)) == info
    shared = client_info(parse_config({"share-label-counts": True}), 0)
    assert sum(shared.label_counts) == shared.num_examples


def test_partition_file_says_label_counts_are_unknown(tmp_path):
    outputs.write_partition(tmp_path, [ClientInfo(0, 5, None), ClientInfo(1, 7, None)], None)
    rows = results.read_csv(tmp_path / results.PARTITION)
    assert rows == [{"client": "0", "num_examples": "5", "labels": "unknown"},
                    {"client": "1", "num_examples": "7", "labels": "unknown"}]  # fmt: skip


def test_a_train_reply_carries_no_training_loss():
    reply = encode_train_reply(ArrayRecord(), TrainReport(3, 40, PrivacySpent()))
    assert set(reply[METRICS]) == {PARTITION_KEY, "num-examples"}


def replace_one_direct(sigma, q, delta):
    """One round's replace-one ε by numerical integration, independent of dp-accounting.

    One client's clipped update v (‖v‖ ≤ 1, noise σ) becomes v' = -v: the pair of output
    laws is (1-q)N(0,σ²) + qN(±1,σ²), and ε is the least ε with hockey-stick ≤ δ.
    """
    x = np.linspace(-40 * sigma, 40 * sigma, 2_000_001)
    dx = x[1] - x[0]

    def gauss(mu):
        return np.exp(-((x - mu) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))

    p, q_ = (1 - q) * gauss(0) + q * gauss(1), (1 - q) * gauss(0) + q * gauss(-1)
    low, high = 0.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        hockey = float(np.sum(np.maximum(p - math.exp(mid) * q_, 0)) * dx)
        low, high = (mid, high) if hockey > delta else (low, mid)
    return high


def test_replace_one_epsilon_against_direct_integration_and_the_audit():
    ours = accounting.history_epsilon(
        [(0.8, 0.3, 1)], delta=DELTA, accountant=accounting.REPLACE_ONE
    )
    assert ours == pytest.approx(replace_one_direct(0.8, 0.3, DELTA), rel=0.02)
    # the audit's two frontier points: user-level (zero-out) ε, then what it implies
    for sigma, add_remove, replace in [(2.7051, 0.989, 1.853), (0.7695, 7.98, 9.88)]:
        history = [(sigma, 0.1, 40)]
        assert accounting.history_epsilon(history, delta=DELTA, accountant="pld") == pytest.approx(
            add_remove, abs=0.01
        )
        assert accounting.history_epsilon(
            history, delta=DELTA, accountant=accounting.REPLACE_ONE
        ) == pytest.approx(replace, abs=0.01)


def test_user_level_summary_states_what_it_implies_for_one_example(tmp_path):
    state = user_state("user", COHORTS)
    state.arrays = {}
    summary = outputs.write_final(
        state, tmp_path, time.time(), engine="deployment", training=TRAINING
    )
    implied = [g for g in summary["guarantees"] if g.get("implied_by") == "user"]
    assert len(implied) == 1 and implied[0]["accountant"] == accounting.REPLACE_ONE
    assert implied[0]["epsilon"] > summary["epsilon"]
    user = next(g for g in summary["guarantees"] if g["unit"] == "user")
    assert "server" in user["trusted"]  # DP-FedAvg cannot protect against its own server
    assert summary["noise"]["kind"] == "seeded" and "seed" in summary["noise"]["meaning"]


# 6. next-char-loss = "all": one per-sample loss, the mean over positions ------------


class PerPosition(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(11, 6), nn.Linear(6, 11)

    def forward(self, x, all_positions=False):
        logits = self.fc(self.emb(x))  # (N, T, C)
        return logits.transpose(1, 2) if all_positions else logits[:, -1]


def per_sample_norms(mode, x, targets):
    torch.manual_seed(0)
    model = PerPosition().double()
    if mode == "fast":
        clipper = FastClipper(model, max_grad_norm=1.0)
        clipper.backward(per_sample_cross_entropy(model(x, all_positions=True), targets))
        return clipper.per_sample_norms
    gsm = GradSampleModule(model)
    nn.functional.cross_entropy(gsm(x, all_positions=True), targets).backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in model.parameters()], 1)
    return norms.norm(dim=1)


def test_fast_and_hooks_clip_the_same_per_sample_gradient_of_all_positions():
    x = torch.randint(1, 11, (6, 9))
    targets = torch.randint(0, 11, (6, 9))
    fast, hooks = per_sample_norms("fast", x, targets), per_sample_norms("hooks", x, targets)
    assert torch.allclose(fast, hooks, rtol=1e-8)


@pytest.mark.parametrize("mode", ["fast", "ghost"])
def test_every_mode_takes_the_same_all_positions_step(mode):
    x = np.random.default_rng(0).integers(1, 11, (40, 9))
    y = np.random.default_rng(1).integers(0, 11, 40)
    weights = {}  # clip 0.9: about the median per-sample norm, so some samples are clipped
    for m in ("hooks", mode):
        torch.manual_seed(0)
        model = PerPosition()
        train_local(model, x, y, epochs=1, batch_size=10, lr=0.5, noise_multiplier=0.0,
                    max_grad_norm=0.9, grad_sample=m, all_positions=True,
                    randomness=seeded())  # fmt: skip
        weights[m] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(weights[mode], weights["hooks"], atol=1e-5)


# 7. Summary keys say what they hold ---------------------------------------------------


def test_the_client_with_the_largest_epsilon_is_named_as_a_client(tmp_path):
    config = parse_config({"num-clients": 3, "clients-per-round": 2, "noise-multiplier": 1.0})
    state = RunState(config, [ClientInfo(c, 50, None) for c in range(3)])
    for r, cohort in enumerate([[0, 2], [2, 1]], start=1):
        for c in cohort:
            privacy.record(state.ledger, c, r, state.prescribed[c])
        row, private = outputs.round_rows(state, r, 0.5, 0.5, cohort=cohort, dropped={},
                                          clip_norm=None, seconds=0.0)  # fmt: skip
        state.rows.append(row)
        state.participation.append(private)
    state.arrays = {}
    summary = outputs.write_final(
        state, tmp_path, time.time(), engine="simulation", training=TRAINING
    )
    assert "epsilon_max_client" not in summary
    assert summary["client_with_max_epsilon"] == 2


@pytest.mark.parametrize(("dp", "clock"), [("user", False), ("sample", True)])
def test_a_sweep_says_no_run_time_where_cohorts_are_secret(tmp_path, monkeypatch, dp, clock):
    """With one point at a time, the differences between the times a sweep says are each
    run's time, which under user-level DP tells how many clients took part."""
    given = {}

    def recorded(points, out, config, jobs, **kwargs):
        given.update(kwargs)
        return []

    monkeypatch.setattr(sweep, "run_points", recorded)
    base = {"dp": dp, "noise-multiplier": 1.0, "user-noise-multiplier": 1.0}
    sweep.run_sweep(base, grid={"lr": [0.1]}, seeds=[0], jobs=1, out=tmp_path / "s")
    assert given == {"clock": clock}
    line = SweepProgress(2, clock=clock).point("a", True, "accuracy 0.5")
    assert ("so far" in line) is clock
