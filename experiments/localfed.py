"""A Flower federation of real processes on this machine: SuperLink, SuperNodes, ``flwr``.

Every process gets its own ``FLWR_HOME`` and log file in one work folder, and is
stopped with all it started (see :mod:`fedsim.experiments.procs`). :class:`LocalFederation`
stops everything when its ``with`` block ends, by success, an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.errors import FedsimError
from fedsim.experiments.procs import STOP_GRACE_S, free_port, kill_tagged, spawn, stop_tree, tail

# what stops a deploy: Ctrl-C, a `kill`, and a closed terminal or ssh session
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

FLOWER_TOOLS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
START_TIMEOUT_S = 60.0
CONNECTION = "fedsim-deploy"  # the SuperLink connection's name in the CLI's config.toml


def flower_bin() -> Path:
    """The folder of Flower's commands: the one holding the running Python."""
    bindir = Path(sys.executable).parent
    missing = [tool for tool in FLOWER_TOOLS if not (bindir / tool).is_file()]
    if missing:
        raise FedsimError(
            f"{', '.join(missing)} not found in {bindir}; run fedsim from the environment "
            "flwr is installed in (./install.sh sets one up in .venv)"
        )
    return bindir


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: nothing outside this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class LocalFederation:
    """SuperLink, SuperNodes and ``flwr`` commands under one work folder.

    Each process gets its own ``FLWR_HOME`` and log file in ``work``. The ``flwr`` CLI
    reaches the SuperLink through the connection ``fedsim-deploy`` in ``work/home-cli/config.toml``.
    """

    work: Path
    certs: dict[str, Path] | None = None  # "ca", "cert", "key": TLS when given
    auth: bool = False
    host: str = "127.0.0.1"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    python_path: list[str] = field(default_factory=list)  # where users' own parts live

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc_info) -> None:
        with signals_ignored():  # a second Ctrl-C mid-stop would leave processes running
            self.stop_all()

    @property
    def address(self) -> str:
        """Where clients on this machine reach the SuperLink."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def env(self, home: str) -> dict[str, str]:
        """Environment of a child: Flower's tools on PATH, no dependency installs."""
        env = dict(os.environ)
        env["PATH"] = f"{flower_bin()}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(self.work / home)
        if self.python_path:  # a SuperNode's ClientApp imports the run's own parts by name
            env["PYTHONPATH"] = os.pathsep.join([*self.python_path, env.get("PYTHONPATH", "")])
        # Flower would otherwise `uv sync` the app into a new environment (GBs of CUDA)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        return env

    @property
    def tag(self) -> str:
        """The environment tag of this federation's processes."""
        return str(self.work)

    def spawn(self, name: str, args: list[str], home: str = "") -> subprocess.Popen:
        """Start Flower command ``args`` as ``name`` (log ``name.log``, home ``home-name``)."""
        command = [str(flower_bin() / args[0]), *args[1:]]
        env = self.env(home or f"home-{name}")
        proc = spawn(command, self.work / f"{name}.log", env, f"{self.tag}/{name}")
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        """Start the SuperLink on a free port and wait until it accepts connections."""
        self.port = free_port(self.host or "127.0.0.1")
        args = ["flower-superlink", "--host", self.host, "--port", str(self.port)]
        if self.certs is None:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(self.certs["ca"])]
            args += ["--ssl-certfile", str(self.certs["cert"])]
            args += ["--ssl-keyfile", str(self.certs["key"])]
        if self.auth:
            args.append("--enable-supernode-auth")
        proc = self.spawn("superlink", [*args, "--disable-runtime-dependency-installation"])
        self._wait_listening(proc, "superlink")
        self._write_cli_config()

    def _wait_listening(self, proc: subprocess.Popen, name: str) -> None:
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FedsimError(
                    f"the {name} exited at start-up (code {proc.returncode}): "
                    f"{tail(self.work / f'{name}.log')}; logs in {self.work}"
                )
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise FedsimError(f"the {name} did not listen within {START_TIMEOUT_S:.0f} s")

    def _write_cli_config(self) -> None:
        # not Flower's own name "local": for that one, `flwr` starts a simulation SuperLink
        # of its own in the background when the file is missing
        lines = [
            "[superlink]",
            f"default = {json.dumps(CONNECTION)}",
            "",
            f"[superlink.{CONNECTION}]",
        ]
        lines.append(f"address = {json.dumps(self.address)}")
        if self.certs is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {json.dumps(str(self.certs['ca']))}")
        (self.work / "home-cli").mkdir(parents=True, exist_ok=True)
        (self.work / "home-cli" / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run one ``flwr`` command against this SuperLink; fail with its last line."""
        result = subprocess.run(
            [str(flower_bin() / "flwr"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env("home-cli"),
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
            raise FedsimError(f"flwr {args[0]} failed: {' '.join(last) or 'no output'}")
        return result

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (SuperNode auth)."""
        self.flwr("supernode", "register", str(public_key), CONNECTION)

    def start_supernode(
        self, name: str, node_config: dict[str, int | str], private_key: Path | None = None
    ) -> subprocess.Popen:
        """Start a SuperNode with ``--node-config`` built from ``node_config``."""
        pairs = " ".join(
            f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items()
        )
        args = ["flower-supernode", "--superlink", self.address, "--node-config", pairs]
        args += ["--port", str(free_port())]
        if self.certs is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.certs["ca"])]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(private_key)]
        return self.spawn(name, args)

    def submit(self, app: Path, run_config: Path) -> subprocess.Popen:
        """``flwr run APP fedsim-deploy --run-config FILE --stream``; it exits when the run ends."""
        args = ["flwr", "run", str(app), CONNECTION, "--run-config", str(run_config), "--stream"]
        return self.spawn("flwr-run", args, home="home-cli")

    def run_status(self, run_id: str) -> tuple[str, str]:
        """(status, details) of a run, e.g. ("finished:completed", "N/A")."""
        out = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json").stdout
        run = json.loads(out[out.index("{") :])["runs"][0]
        return run["status"], run.get("status-details", "")

    def stop(self, name: str, grace: float = STOP_GRACE_S) -> None:
        """Stop one process and all it started; ``grace`` 0 kills it as a crash would."""
        stop_tree(self.procs[name], f"{self.tag}/{name}", grace)

    def stop_all(self) -> None:
        """Stop every process, SuperNodes and the run first, the SuperLink last.

        A last sweep kills whatever still carries this federation's tag: a child whose
        start was interrupted (Ctrl-C inside ``Popen``) never made it into ``procs``.
        """
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            self.stop(name)
        kill_tagged(f"{self.tag}/", prefix=True)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored (main thread only), so a stop runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
