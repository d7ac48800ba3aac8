"""Deployment pieces without a federation: certificates, configs, processes, replies."""

import os
import subprocess
import sys
import time
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import ArrayRecord, ConfigRecord, Error, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.cli.supernode.register import try_load_public_key
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedsim.clients.task import client_data
from fedsim.config import deploy_config, parse_config, toml_table
from fedsim.data import check_node_data
from fedsim.errors import FedsimError
from fedsim.experiments.certs import main as certs_main
from fedsim.experiments.certs import make_certificates, make_supernode_keys
from fedsim.experiments.localfed import is_loopback
from fedsim.experiments.procs import spawn, stop_tree, tagged
from fedsim.experiments.raystart import WORKER_PRELOAD, ray_init_args
from fedsim.experiments.run import client_resources
from fedsim.messages import ARRAYS, CONFIG, PARTITION_KEY
from fedsim.server.rounds import screen_replies, why_dropped


def test_server_certificate_chains_to_ca_and_names_hosts(tmp_path):
    paths = make_certificates(tmp_path, ("10.0.0.7", "link.example.org"))
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "link.example.org"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {
        "127.0.0.1",
        "10.0.0.7",
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert oct(paths["key"].stat().st_mode & 0o777) == "0o600"


def test_supernode_keys_load_the_way_flower_loads_them(tmp_path):
    private, public = make_supernode_keys(tmp_path, 1)[0]
    key = load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public)  # as `flwr supernode register` does
    assert oct(private.stat().st_mode & 0o777) == "0o600"


def test_certs_command_never_overwrites_and_writes_nothing_on_refusal(tmp_path, capsys):
    assert certs_main([str(tmp_path), "--supernodes", "2"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(before) == 8
    (tmp_path / "supernode-1").unlink()
    assert certs_main([str(tmp_path), "--supernodes", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "supernode-1").exists()  # nothing written, not even the free name
    assert certs_main([str(tmp_path), "--supernodes", "-1"]) == 2


def test_num_nodes_sets_clients_and_caps_clients_per_round(tmp_path):
    config = deploy_config({}, 2)
    assert (config.num_clients, config.clients_per_round) == (2, 2)
    assert deploy_config({"clients-per-round": 1}, 3).clients_per_round == 1
    with pytest.raises(FedsimError, match="disagrees"):
        deploy_config({"num-clients": 4}, 2)
    relative = deploy_config({"data-dir": "somewhere"}, 2).data_dir
    assert os.path.isabs(relative) and relative.endswith("somewhere")


def test_run_config_file_round_trips():
    config = parse_config({"lr": 0.25, "delta": 1e-5, "data-dir": '/x y/"z"\\w'})
    flat = config.to_flat()
    assert tomllib.loads(toml_table(flat)) == flat


def test_ray_address_goes_to_ray_init():
    local = ray_init_args(parse_config({}), verbose=False)
    assert local["address"] == "local"
    assert local["_system_config"] == {
        "preload_python_modules": [WORKER_PRELOAD],
        "worker_niceness": 0,  # the clients do the run's work: not Ray's nice 15
    }
    assert "runtime_env" not in local  # one would keep Flower's actors out of warm workers
    auto = ray_init_args(parse_config({"ray-address": "auto"}), verbose=False)
    assert "num_cpus" not in auto and "_system_config" not in auto  # a cluster takes neither
    config = parse_config({"ray-address": "10.0.0.2:6379", "client-gpus": 0.25})
    remote = ray_init_args(config, verbose=False)
    assert remote["address"] == "10.0.0.2:6379"
    assert remote["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] == sys.path[0]
    assert client_resources(config) == {"num_cpus": 1.0, "num_gpus": 0.25}
    for bad in ("nowhere", "10.0.0.2", "auto:x"):
        with pytest.raises(FedsimError, match="ray-address"):
            parse_config({"ray-address": bad})


@pytest.mark.parametrize(
    ("values", "cpus"),
    [
        ({"num-clients": 5, "clients-per-round": 2}, 2),
        ({"num-clients": 8, "clients-per-round": 8, "clients-per-worker": 4}, 2),
        ({"num-clients": 3, "clients-per-round": 3, "client-cpus": 0.5}, 2),
        ({"num-clients": 1, "clients-per-round": 1}, 1),
    ],
)
def test_a_local_ray_gets_the_cpus_of_the_workers_a_run_needs(values, cpus, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    init = ray_init_args(parse_config(values), verbose=False)
    assert init["num_cpus"] == cpus  # Flower starts as many workers as these CPUs fit
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert ray_init_args(parse_config(values), verbose=False)["num_cpus"] == 1


@pytest.mark.parametrize(
    ("values", "ahead"),
    [
        ({}, True),  # a worker per CPU, an actor per worker: each starts warm
        ({"client-cpus": 0.5}, True),  # more actors than CPUs
        ({"client-cpus": 2}, False),  # half the CPUs' workers would never host a client
        ({"client-cpus": 2, "client-gpus": 0.5}, True),  # GPUs may decide: Ray's default
    ],
)
def test_ray_starts_workers_ahead_only_where_each_hosts_an_actor(values, ahead, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    system = ray_init_args(parse_config(values), verbose=False)["_system_config"]
    assert system.get("prestart_worker_first_driver", True) is ahead
    assert system["preload_python_modules"] == [WORKER_PRELOAD]


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_loopback(host, local):
    assert is_loopback(host) is local


def test_stop_tree_stops_children_that_left_their_parent(tmp_path):
    # the child starts a grandchild in a new session and exits: only the tag finds it
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
        " start_new_session=True)\n"
        "time.sleep(300)\n"
    )
    tag = f"{tmp_path}/t"
    proc = spawn([sys.executable, "-c", script], tmp_path / "log", dict(os.environ), tag)
    deadline = time.monotonic() + 30
    while len(tagged(tag)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(tagged(tag)) == 2
    os.kill(proc.pid, 9)  # the parent dies; the grandchild is re-parented and lives on
    proc.wait()
    assert len(tagged(tag)) == 1
    stop_tree(proc, tag, grace=2)
    assert tagged(tag) == []


def _message(message_id, src, dst, reply_to="", error=None, client=None):
    meta = Metadata(1, message_id, src, dst, reply_to, "", time.time(), 60.0, MessageType.TRAIN)
    content = RecordDict()
    if client is not None:  # a train message names its client
        content = RecordDict({CONFIG: ConfigRecord({PARTITION_KEY: client})})
    return make_message(meta, content=None if error else content, error=error)


def test_superlink_error_for_a_dead_node_names_its_client():
    sent = [_message("m-a", 1, 11, client=0), _message("m-b", 1, 12, client=1)]
    # the SuperLink's own reply for a node that missed its heartbeats (src: SuperLink)
    unavailable = create_message_error_unavailable_res_message(sent[1].metadata, "node_unavail")
    failed = _message("r-a", 11, 1, "m-a", Error(0, "<class 'X'>:<'disk full'>"))
    good, dropped = screen_replies(sent, [unavailable, failed], timeout=5)
    assert good == []
    assert dropped[1].startswith("Error: Node Unavailable")
    assert dropped[0] == "error: disk full"  # the client's own text: marked as such
    _, dropped = screen_replies(sent, [], timeout=5)
    assert dropped == {0: "no reply within round-timeout (5 s)", 1: dropped[0]}
    # the error of a round that had too few: each reason once, with its clients
    assert why_dropped({3: "a", 0: "b", 1: "a"}) == "client 0: b; clients 1, 3: a"


def test_two_clients_on_one_worker_node_are_told_apart_by_message_id():
    sent = [_message("m-a", 1, 11, client=4), _message("m-b", 1, 11, client=9)]
    ok = _message("r-b", 11, 1, "m-b")
    ok.content[ARRAYS] = ArrayRecord()
    failed = _message("r-a", 11, 1, "m-a", Error(0, "<class 'X'>:<'disk full'>"))
    good, dropped = screen_replies(sent, [ok, failed], timeout=5)
    assert good == [ok] and dropped == {4: "error: disk full"}
    # one reply for a node with two clients: not guessed by node, the other is missing
    _, dropped = screen_replies(sent, [ok], timeout=5)
    assert dropped == {4: "no reply within round-timeout (5 s)"}


def test_cli_lists_deploy():
    result = subprocess.run(
        [sys.executable, "-m", "fedsim.experiments.cli", "deploy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for flag in ("--num-nodes", "--tls", "--auth", "--node-data-dir", "--host", "--timeout"):
        assert flag in result.stdout


def test_node_data_folders_that_would_share_examples_are_refused(tmp_path):
    """Two clients holding the same examples would each count them as their own: the
    ledger, and the sample ε, would understate what a reader of both learns."""
    (tmp_path / "a").mkdir()
    digits = parse_config({"num-clients": 2, "clients-per-round": 2, "secure-noise": True})
    with pytest.raises(FedsimError, match="dataset digits reads no data-dir"):
        check_node_data(digits, [tmp_path / "a", tmp_path / "b"])
    mnist = digits.model_copy(update={"dataset": "mnist", "data_dir": str(tmp_path / "a")})
    with pytest.raises(FedsimError, match=r"--node-data-dir .*a is given twice"):
        check_node_data(mnist, [tmp_path / "a", tmp_path / "a" / ".." / "a"])
    with pytest.raises(FedsimError, match="dataset digits reads no data-dir"):  # the node side
        client_data(digits, 0, local_dir=str(tmp_path / "a"))
