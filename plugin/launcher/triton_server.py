"""Run the real ``tritonserver`` binary that NVIDIA ships in the ``nvidia-pytriton`` wheel.

The wheel carries a complete Triton (server binary, shared libraries, Python backend and one Python
backend stub per Python version), but not in a runnable layout: the stub for the running Python has
to sit beside ``libtriton_python.so``. ``EmbeddedTriton`` prepares that layout once per
(wheel, Python) pair in a cached workspace, starts Triton on local ports in explicit model-control
mode, waits until it and its models are ready, and guarantees the process (and its Python-backend
stub processes) is gone after ``stop()``, on interpreter exit, and (on Linux) even if the parent is
killed. Tests of "Triton goes away" use ``restart()``, which brings it back on the same ports.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

MIN_GLIBC = (2, 35)
"""The wheel's binaries are built against glibc 2.35 (Ubuntu 22.04); older hosts cannot load them."""

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
DEFAULT_MODELS = ("emulated_gpu", "cpu_mlp")

_BIND_FAILURE = re.compile(r"failed to start (\w+) service: .*already in use", re.IGNORECASE)
_instance_counter = itertools.count()


class TritonUnavailable(RuntimeError):
    """The tritonserver binary cannot run here; the message says what is missing and how to fix it."""


class TritonStartError(RuntimeError):
    """Triton was found but did not become ready; the message carries the tail of its log."""


# --------------------------------------------------------------------------------------------------
# Locating the distribution


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of a Triton installation are."""

    binary: Path
    libs_path: Path | None
    """Directory of the bundled shared libraries (put on LD_LIBRARY_PATH); None for a system install."""
    backends_dir: Path
    """Directory holding ``python/libtriton_python.so``."""
    stub: Path | None
    """Python-backend stub built for the running Python; None when ``backends_dir`` already has one."""
    caches_dir: Path | None
    version_key: str
    """Identifies this distribution + Python, to key the prepared workspace."""


def glibc_version() -> tuple[int, int] | None:
    """The C library's version, or None when it is not glibc (musl, macOS)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return None
    m = re.match(r"glibc (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _missing_shared_libraries(path: Path, libs_path: Path | None) -> list[str]:
    """Names of libraries ``ldd`` cannot resolve for ``path`` (empty when ldd is unavailable)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    env = dict(os.environ)
    if libs_path is not None:
        env["LD_LIBRARY_PATH"] = _join_paths(str(libs_path), env.get("LD_LIBRARY_PATH"))
    try:
        out = subprocess.run([ldd, str(path)], env=env, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def _join_paths(first: str, rest: str | None) -> str:
    return f"{first}{os.pathsep}{rest}" if rest else first


_located: dict[tuple[str | None, bool], TritonDistribution] = {}


def locate_triton(binary: str | os.PathLike | None = None, check_libraries: bool = True) -> TritonDistribution:
    """Find a runnable tritonserver: an explicit binary, else the one in the nvidia-pytriton wheel.

    Every failure raises ``TritonUnavailable`` naming the missing package, file or library. A
    success is remembered for the process (the ldd checks cost a few hundred milliseconds).
    """
    key = (None if binary is None else str(binary), check_libraries)
    if key not in _located:
        _located[key] = _locate(binary, check_libraries)
    return _located[key]


def _locate(binary: str | os.PathLike | None, check_libraries: bool) -> TritonDistribution:
    if sys.platform != "linux":
        raise TritonUnavailable(f"the embedded tritonserver runs on Linux only (this is {sys.platform})")
    glibc = glibc_version()
    if glibc is not None and glibc < MIN_GLIBC:
        raise TritonUnavailable(
            f"tritonserver from nvidia-pytriton needs glibc >= {MIN_GLIBC[0]}.{MIN_GLIBC[1]}, this host has "
            f"glibc {glibc[0]}.{glibc[1]}; use the NVIDIA Triton container instead (docker-compose.yml)"
        )
    if binary is not None:
        dist = _explicit_distribution(Path(binary))
    else:
        dist = _pytriton_distribution()
    if check_libraries:
        for path in (dist.binary, dist.stub or dist.backends_dir / "python" / "triton_python_backend_stub"):
            missing = _missing_shared_libraries(path, dist.libs_path)
            if missing:
                raise TritonUnavailable(
                    f"{path} cannot load shared librar{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}"
                    + (
                        f" (the Python-backend stub links libpython{sys.version_info[0]}.{sys.version_info[1]};"
                        " install the Python shared library, e.g. the libpython3.x package)"
                        if any(m.startswith("libpython") for m in missing)
                        else ""
                    )
                )
    return dist


def _explicit_distribution(binary: Path) -> TritonDistribution:
    """A binary given by path, laid out like /opt/tritonserver (bin/, backends/, lib/)."""
    if not binary.is_file():
        raise TritonUnavailable(f"tritonserver binary not found: {binary}")
    if not os.access(binary, os.X_OK):
        raise TritonUnavailable(f"tritonserver binary is not executable: {binary}")
    root = binary.resolve().parent.parent
    backends = root / "backends"
    if not (backends / "python" / "libtriton_python.so").is_file():
        raise TritonUnavailable(f"Python backend not found: {backends / 'python' / 'libtriton_python.so'}")
    stub = backends / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonUnavailable(f"Python backend stub not found: {stub}")
    lib = root / "lib"
    stat = binary.stat()
    key = _digest(str(binary.resolve()), stat.st_size, stat.st_mtime_ns)
    return TritonDistribution(
        binary=binary,
        libs_path=lib if lib.is_dir() else None,
        backends_dir=backends,
        stub=None,
        caches_dir=root / "caches" if (root / "caches").is_dir() else None,
        version_key=key,
    )


def _pytriton_distribution() -> TritonDistribution:
    try:
        import pytriton  # noqa: F401  (only its files are used)
        from pytriton.utils.distribution import get_libs_path
    except ImportError as exc:
        raise TritonUnavailable(
            f"package nvidia-pytriton is not installed ({exc}); install it with "
            "`pip install 'smdp-batching[triton]'` or `pip install nvidia-pytriton`"
        ) from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonUnavailable(f"nvidia-pytriton is installed but its tritonserver binary is missing: {binary}")
    backends = root / "backends"
    if not (backends / "python" / "libtriton_python.so").is_file():
        raise TritonUnavailable(f"nvidia-pytriton's Python backend is missing: {backends / 'python'}")
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").glob("*") if p.is_dir())
        raise TritonUnavailable(
            f"nvidia-pytriton has no Python-backend stub for Python {py} (it has {', '.join(have) or 'none'}): {stub}"
        )
    libs = Path(get_libs_path())
    if not libs.is_dir():
        raise TritonUnavailable(f"nvidia-pytriton's shared libraries are missing: {libs}")
    stat = binary.stat()
    key = _digest(str(binary), stat.st_size, stat.st_mtime_ns, str(stub), stub.stat().st_size, py)
    return TritonDistribution(
        binary=binary,
        libs_path=libs,
        backends_dir=backends,
        stub=stub,
        caches_dir=root / "caches" if (root / "caches").is_dir() else None,
        version_key=key,
    )


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def prepare_backends(dist: TritonDistribution, cache_root: Path | None = None) -> Path:
    """A backends directory with the stub for this Python beside the Python backend, made once.

    Kept under the temp dir keyed by the distribution, so repeated starts (and parallel test
    processes) reuse it; it is built in a private directory and renamed into place atomically.
    """
    if dist.stub is None:
        return dist.backends_dir
    root = cache_root or Path(tempfile.gettempdir()) / f"smdp-triton-{os.getuid()}"
    target = root / dist.version_key / "backends"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="backends.", dir=target.parent))
    try:
        shutil.copytree(dist.backends_dir, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(dist.stub, staging / "python" / "triton_python_backend_stub")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# Configuration


def _check_port(name: str, port: int) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"{name} must be an integer in 0..65535 (0 = pick a free port), got {port!r}")
    return port


@dataclass(frozen=True)
class TritonConfig:
    """How to run one Triton server. Ports set to 0 are picked free at start (and kept on restart)."""

    repository: Path = DEFAULT_REPOSITORY
    models: tuple[str, ...] = DEFAULT_MODELS
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    address: str = "127.0.0.1"
    """Interface to bind every endpoint to; 127.0.0.1 keeps the server private to this machine."""
    binary: Path | None = None
    """An explicit tritonserver (laid out like /opt/tritonserver); None = the nvidia-pytriton wheel's."""
    log_file: Path | None = None
    """Triton's stdout/stderr (and its stubs'); None = a file in a fresh temp directory."""
    log_verbose: int = 0
    startup_timeout_s: float = 60.0
    stop_timeout_s: float = 15.0
    exit_timeout_s: int = 5
    """Triton's own grace period for in-flight inferences at shutdown."""
    bind_retries: int = 3
    """Starts retried when a port is taken between picking it and Triton binding it."""
    die_with_parent: bool = True
    """Linux: Triton gets SIGTERM if the thread that started it dies (PR_SET_PDEATHSIG), so even a
    SIGKILLed parent leaves nothing behind. Start it from a long-lived thread, or set False."""
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if self.binary is not None:
            object.__setattr__(self, "binary", Path(self.binary))
        if self.log_file is not None:
            object.__setattr__(self, "log_file", Path(self.log_file))
        models = (self.models,) if isinstance(self.models, str) else tuple(self.models)
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if not self.repository.is_dir():
            raise ValueError(f"model repository is not a directory: {self.repository}")
        if not models:
            raise ValueError("models must name at least one model to load")
        for m in models:
            if not isinstance(m, str) or not m or "/" in m:
                raise ValueError(f"model name must be a non-empty directory name, got {m!r}")
            if not (self.repository / m / "config.pbtxt").is_file():
                raise ValueError(f"model {m!r} has no config.pbtxt in {self.repository / m}")
        for name in ("grpc_port", "http_port", "metrics_port"):
            _check_port(name, getattr(self, name))
        fixed = [p for p in (self.grpc_port, self.http_port, self.metrics_port) if p]
        if len(set(fixed)) != len(fixed):
            raise ValueError(f"grpc_port, http_port and metrics_port must differ, got {fixed}")
        for name in ("startup_timeout_s", "stop_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.exit_timeout_s < 0 or self.log_verbose < 0 or self.bind_retries < 0:
            raise ValueError("exit_timeout_s, log_verbose and bind_retries must be >= 0")


def free_port(address: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (it may be taken again before use: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# The server


def _pdeathsig_setter():
    """A preexec function that asks the kernel to SIGTERM the child when its parent thread dies.

    prctl is resolved here, in the parent: loading a library between fork and exec can deadlock
    on the dynamic loader's lock if another thread held it at fork time.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return preexec


def _remove_shared_memory(prefix: str) -> None:
    """Delete the Python backend's shm regions: Triton removes them itself only on a clean exit."""
    shm = Path("/dev/shm")
    if prefix and shm.is_dir():
        for region in shm.glob(f"{prefix}*"):
            try:
                region.unlink()
            except OSError:
                pass


def _terminate(proc: subprocess.Popen, timeout_s: float, shm_prefix: str = "") -> None:
    """SIGTERM Triton, wait, then SIGKILL its whole process group (stubs included)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    # Whatever is left in the group (a hung server, orphaned Python-backend stubs) goes now.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    _remove_shared_memory(shm_prefix)


class EmbeddedTriton:
    """One tritonserver process with a repository and a set of models loaded (explicit mode)."""

    def __init__(self, config: TritonConfig | None = None, **overrides) -> None:
        config = config or TritonConfig()
        self.config = replace(config, **overrides) if overrides else config
        self._dist: TritonDistribution | None = None
        self._backends: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._ports: dict[str, int] = {}
        self._lock = threading.RLock()
        self.shm_prefix = f"smdp{os.getpid()}_{next(_instance_counter)}_"
        self._log_dir: Path | None = None
        self.log_path: Path = self.config.log_file or self._default_log_path()

    def _default_log_path(self) -> Path:
        self._log_dir = Path(tempfile.mkdtemp(prefix="smdp-triton-log."))
        weakref.finalize(self, shutil.rmtree, str(self._log_dir), True)
        return self._log_dir / "tritonserver.log"

    # -- endpoints ---------------------------------------------------------------------------------

    def _port(self, name: str) -> int:
        if name not in self._ports:
            raise RuntimeError("Triton has not been started yet: its ports are chosen by start()")
        return self._ports[name]

    @property
    def grpc_port(self) -> int:
        return self._port("grpc")

    @property
    def http_port(self) -> int:
        return self._port("http")

    @property
    def metrics_port(self) -> int:
        return self._port("metrics")

    @property
    def _host(self) -> str:
        return "127.0.0.1" if self.config.address in ("0.0.0.0", "") else self.config.address

    @property
    def grpc_url(self) -> str:
        """``host:port`` as tritonclient.grpc.InferenceServerClient(url=...) expects."""
        return f"{self._host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http.InferenceServerClient(url=...) expects."""
        return f"{self._host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus scrape URL."""
        return f"http://{self._host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "EmbeddedTriton":
        """Start Triton and block until it and all its models are ready."""
        with self._lock:
            if self.is_running():
                return self
            if self._dist is None:
                self._dist = locate_triton(self.config.binary)
                self._backends = prepare_backends(self._dist)
            keep_ports = bool(self._ports)  # a restart reuses the ports clients already know
            attempts = self.config.bind_retries + 1
            for attempt in range(attempts):
                if not keep_ports:
                    self._ports = self._choose_ports()
                try:
                    self._launch_and_wait()
                    return self
                except _BindFailed as exc:
                    if attempt == attempts - 1:
                        raise TritonStartError(f"{exc}; gave up after {attempts} attempts\n{self.log_tail()}") from None
                    # Picked ports were taken meanwhile: pick again. Fixed or restart ports: the old
                    # socket may still be closing, so wait a little and retry the same ones.
                    time.sleep(0.5 * (attempt + 1))
            raise AssertionError("unreachable")

    def _choose_ports(self) -> dict[str, int]:
        chosen: dict[str, int] = {}
        for name, port in (
            ("grpc", self.config.grpc_port),
            ("http", self.config.http_port),
            ("metrics", self.config.metrics_port),
        ):
            fixed = {self.config.grpc_port, self.config.http_port, self.config.metrics_port}
            while not port or port in chosen.values():
                port = free_port(self.config.address or "127.0.0.1")
                if port in fixed:
                    port = 0
            chosen[name] = port
        return chosen

    def _command(self) -> list[str]:
        assert self._dist is not None and self._backends is not None
        cfg = self.config
        cmd = [
            str(self._dist.binary),
            f"--model-repository={cfg.repository.resolve()}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in cfg.models),
            f"--grpc-address={cfg.address}",
            f"--grpc-port={self._ports['grpc']}",
            f"--http-address={cfg.address}",
            f"--http-port={self._ports['http']}",
            f"--metrics-address={cfg.address}",
            f"--metrics-port={self._ports['metrics']}",
            f"--backend-directory={self._backends}",
            # Python-backend shared-memory regions are named by this prefix; two servers on one
            # host with the default prefix corrupt each other's regions.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            f"--log-verbose={cfg.log_verbose}",
            "--allow-gpu-metrics=false",
        ]
        if self._dist.caches_dir is not None:
            cmd.append(f"--cache-directory={self._dist.caches_dir}")
        cmd.extend(cfg.extra_args)
        return cmd

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self._dist is not None and self._dist.libs_path is not None:
            env["LD_LIBRARY_PATH"] = _join_paths(str(self._dist.libs_path), env.get("LD_LIBRARY_PATH"))
        # The stub embeds libpython and finds its prefix (hence numpy and the project) from the
        # first python on PATH: make it this interpreter's environment.
        env["PATH"] = _join_paths(str(Path(sys.executable).parent), env.get("PATH"))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _launch_and_wait(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== smdp: starting {' '.join(self._command())}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(),
                    start_new_session=True,  # own process group: Ctrl-C goes to us, and killpg reaps stubs
                    preexec_fn=_pdeathsig_setter() if self.config.die_with_parent else None,
                )
            except OSError as exc:
                raise TritonUnavailable(f"cannot execute {self._dist.binary}: {exc}") from None
        self._proc = proc
        self._finalizer = weakref.finalize(self, _terminate, proc, self.config.stop_timeout_s, self.shm_prefix)
        try:
            self._wait_ready(proc)
        except BaseException:
            self._stop_process()
            raise

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self.config.models)]
        while True:
            code = proc.poll()
            if code is not None:
                self._raise_exit(code)
            if all(self._http_ok(p) for p in paths):
                return
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver (pid {proc.pid}) was not ready within {self.config.startup_timeout_s:g} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _raise_exit(self, code: int) -> None:
        text = self._new_log_text()
        bind = _BIND_FAILURE.search(text)
        if bind:
            raise _BindFailed(f"tritonserver could not bind its {bind.group(1)} port ({bind.group(0)})")
        lib = re.search(r"error while loading shared libraries: ([^:]+)", text)
        if lib:
            raise TritonUnavailable(
                f"tritonserver cannot load shared library {lib.group(1)}; is nvidia-pytriton complete and "
                f"LD_LIBRARY_PATH right? Log {self.log_path}:\n{self.log_tail()}"
            )
        glibc = re.search(r"GLIBC_[0-9.]+' not found", text)
        if glibc:
            raise TritonUnavailable(
                f"tritonserver needs a newer glibc ({glibc.group(0)}; >= 2.35 required)\n{self.log_tail()}"
            )
        raise TritonStartError(
            f"tritonserver exited with code {code} before becoming ready; log {self.log_path}:\n{self.log_tail()}"
        )

    def _new_log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(getattr(self, "_log_offset", 0))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the log of the current (or last) run, table borders dropped."""
        lines = [ln for ln in self._new_log_text().splitlines() if not ln.startswith(("+--", "| "))]
        return "\n".join(lines)[-max_chars:]

    def stop(self) -> None:
        """Stop Triton (SIGTERM, then SIGKILL after ``stop_timeout_s``); idempotent."""
        with self._lock:
            self._stop_process()

    def _stop_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _terminate once and detaches it from interpreter exit
            self._finalizer = None
        self._proc = None

    def kill(self) -> None:
        """SIGKILL Triton at once, as a crash would (no graceful shutdown)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._stop_process()  # reaps it and removes the shm regions a crash leaves behind

    def restart(self) -> "EmbeddedTriton":
        """Stop and start again on the same ports, so clients' URLs stay valid."""
        with self._lock:
            self.stop()
            return self.start()

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until Triton exits (or timeout); its exit code, or None if still running."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> "EmbeddedTriton":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running pid {self.pid} grpc {self.grpc_url}" if self.is_running() else "stopped"
        return f"EmbeddedTriton({state}, models={list(self.config.models)})"


class _BindFailed(TritonStartError):
    """A port was taken; start() retries."""


def start_triton(
    repository: str | os.PathLike = DEFAULT_REPOSITORY,
    models: Sequence[str] = DEFAULT_MODELS,
    **options,
) -> EmbeddedTriton:
    """Convenience: build the config, start, return the running server (caller stops it)."""
    return EmbeddedTriton(TritonConfig(repository=Path(repository), models=tuple(models), **options)).start()
