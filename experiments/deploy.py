"""``fedsim deploy``: a whole federation of real processes on this machine.

It starts a SuperLink and one SuperNode per client, submits this project's app with
``flwr run``, prints one line per finished round, stops every process it started and
leaves the results folder the ServerApp wrote, exactly as ``fedsim run`` does.
``README.md`` ("Deploy on several machines") has the same steps one machine at a time.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

from fedsim import results
from fedsim.config import FedsimConfig, toml_table
from fedsim.data import Dataset, check_node_data
from fedsim.errors import FedsimError
from fedsim.experiments.certs import make_certificates, make_supernode_keys
from fedsim.experiments.localfed import LocalFederation, flower_bin, is_loopback
from fedsim.experiments.machine import check_machine
from fedsim.experiments.run import preflight
from fedsim.experiments.rundir import claim_default, claim_new
from fedsim.experiments.watch import follow_run
from fedsim.registry import import_roots

APP_DIR = Path(__file__).resolve().parents[1]


def deploy(
    config: FedsimConfig,
    *,
    out: Path | None = None,
    tls: bool | None = None,
    auth: bool | None = None,
    host: str = "127.0.0.1",
    node_data_dirs: tuple[Path, ...] = (),
    timeout: float = 0.0,
    verbose: bool = False,
    dataset: Dataset | None = None,
) -> Path:
    """Run ``config`` on a SuperLink and ``num-clients`` SuperNodes; return the results.

    Parameters
    ----------
    config
        The experiment; one SuperNode is started per client.
    out
        Results folder (default ``<out-dir>/<name>-<time>``).
    tls, auth
        TLS with freshly made test certificates; SuperNode authentication with freshly
        made, registered key pairs (needs ``tls``). None: on unless ``host`` is loopback.
    host
        Where the SuperLink listens; anything but loopback lets other machines in.
    node_data_dirs
        One folder per SuperNode: each trains on all of its own local dataset there
        instead of a partition of the run's dataset.
    timeout
        Stop everything if the run has not finished after this many seconds (0: never).
    verbose
        Echo Flower's log stream of the run.
    dataset
        ``load_checked(config)``'s, where the caller has checked it: not loaded again.

    """
    tls, auth = _security(host, tls, auth)
    flower_bin()
    _check_checkout()
    _preflight(config, node_data_dirs, dataset)
    claim = claim_new(out) if out else claim_default(config.out_dir, config.name)
    run_dir, staging = claim.run_dir, claim.staging
    try:
        work = Path(tempfile.mkdtemp(prefix="fedsim-deploy-"))
        with _kept_on_error(work):
            _federate(
                work, config, staging, node_data_dirs, tls=tls, auth=auth, host=host,
                timeout=timeout, verbose=verbose,
            )  # fmt: skip
            _finish(staging, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        claim.release()
    return run_dir


def _check_checkout() -> None:
    """Refuse an installed copy: ``flwr run`` submits the app from a source checkout."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise FedsimError(
            f"{APP_DIR} has no pyproject.toml: fedsim deploy submits the app from a source "
            "checkout; install fedsim from its repository with ./install.sh"
        )


@contextlib.contextmanager
def _kept_on_error(work: Path) -> Iterator[None]:
    """Remove ``work`` afterwards, but keep it, named in the error, after a FedsimError."""
    try:
        yield
    except FedsimError as exc:  # keep the work folder: its logs tell what went wrong
        if str(work) not in str(exc):
            raise FedsimError(f"{exc}; logs in {work}") from None
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)


def _federate(
    work: Path,
    config: FedsimConfig,
    staging: Path,
    node_data_dirs: tuple[Path, ...],
    *,
    tls: bool,
    auth: bool,
    host: str,
    timeout: float,
    verbose: bool,
) -> None:
    """A SuperLink and the SuperNodes in ``work`` run ``config``, then stop.

    The ServerApp writes into ``staging``. SIGTERM stops everything as Ctrl-C does.
    """
    roots = import_roots(config.own_parts)
    with (
        LocalFederation(work, auth=auth, host=host, python_path=roots) as fed,
        _sigterm_as_interrupt(),
    ):
        if tls:
            fed.certs = make_certificates(work / "certs", _cert_hosts(host))
        app = app_sources(work / "app")
        _start(fed, config, node_data_dirs)
        _submit_and_follow(fed, config, app, staging, timeout=timeout, verbose=verbose)


def _security(host: str, tls: bool | None, auth: bool | None) -> tuple[bool, bool]:
    """(TLS, SuperNode auth): as asked, else on unless ``host`` is loopback; warns if off."""
    local = is_loopback(host)
    tls, auth = (not local if tls is None else tls), (not local if auth is None else auth)
    if not local and not (tls and auth):
        print(f"fedsim: warning: SuperLink on {host} without TLS and auth", flush=True)
    if auth and not tls:
        raise FedsimError(
            "--auth needs --tls: Flower's SuperLink refuses SuperNode auth without TLS"
        )
    return tls, auth


def _cert_hosts(host: str) -> tuple[str, ...]:
    """Names the SuperLink certificate needs beyond loopback (none for 0.0.0.0 or ::)."""
    return () if is_loopback(host) or host in ("0.0.0.0", "::", "") else (host,)


def app_sources(folder: Path) -> Path:
    """A copy in ``folder`` of what a FAB ships: pyproject.toml and its ``fab-include`` files.

    ``flwr run`` walks and resolves every file under the folder it is given before its
    patterns filter them, a checkout's ``.venv`` included: 7.6 s of a 9.6 s ``flwr build``
    of this checkout on 2 cores. ``flwr build`` of the copy takes 2.2 s, most of it
    importing Flower.
    """
    pyproject = APP_DIR / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["fab-include"]
    folder.mkdir()
    shutil.copy2(pyproject, folder)
    for pattern in patterns:
        for path in APP_DIR.glob(pattern):
            if path.is_file() and "__pycache__" not in path.parts:
                copy = folder / path.relative_to(APP_DIR)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy)
    return folder


def _submit_and_follow(
    fed: LocalFederation,
    config: FedsimConfig,
    app: Path,
    staging: Path,
    *,
    timeout: float,
    verbose: bool,
) -> None:
    """``flwr run`` with the resolved config; the ServerApp writes into ``staging``."""
    mode = "insecure"
    if fed.certs is not None:
        mode = "TLS, SuperNode auth" if fed.auth else "TLS"
    print(
        f"fedsim: SuperLink at {fed.address} ({mode}), {config.num_clients} SuperNodes",
        flush=True,
    )
    run_config = fed.work / "run-config.toml"
    run_config.write_text(toml_table({**config.to_flat(), "out-dir": str(staging)}))
    print("fedsim: submitting the run with flwr run", flush=True)
    run = fed.submit(app, run_config)
    follow_run(fed, run, config, staging, timeout=timeout, verbose=verbose)


def _preflight(
    config: FedsimConfig, node_data_dirs: tuple[Path, ...], dataset: Dataset | None
) -> None:
    if node_data_dirs:
        check_node_data(config, node_data_dirs)
        check_machine(config)  # preflight's other half: the SuperNodes run here
    else:
        preflight(config, dataset)


def _start(fed: LocalFederation, config: FedsimConfig, node_data_dirs: tuple[Path, ...]) -> None:
    """SuperLink, then (keys registered where auth is on) one SuperNode per client."""
    fed.start_superlink()
    keys = []
    if fed.auth:
        keys = [
            private for private, _ in make_supernode_keys(fed.work / "keys", config.num_clients)
        ]
        for private in keys:
            fed.register(private.with_suffix(".pub"))
    for i in range(config.num_clients):
        node: dict[str, int | str] = {"partition-id": i, "num-partitions": config.num_clients}
        if node_data_dirs:
            node["data-dir"] = str(Path(node_data_dirs[i]).resolve())
        fed.start_supernode(f"supernode-{i}", node, keys[i] if keys else None)


def _finish(staging: Path, run_dir: Path) -> None:
    """Move the ServerApp's folder out of ``staging`` to ``run_dir``, without checkpoint."""
    folders = [p for p in staging.iterdir() if (p / results.SUMMARY).is_file()]
    if len(folders) != 1:
        raise FedsimError(f"expected one finished run in {staging}, found {len(folders)}")
    (folders[0] / results.CHECKPOINT).unlink(missing_ok=True)
    folders[0].rename(run_dir)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a `kill`, a CI timeout) and SIGHUP (a closed terminal) clean up as Ctrl-C."""

    def handler(signum, frame) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
