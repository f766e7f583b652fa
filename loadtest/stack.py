"""The system under test for a bench: an embedded Triton, sidecar and solver processes, always torn down.

The sidecar runs as its own process (``smdp serve``), not on a thread of the bench: the load
generator, the sidecar and Triton then have one interpreter lock each, so on a small host the
client's send lag and the gate's decisions do not queue behind each other's Python code. The shared
solver service (``smdp solver-serve``) runs the same way when an adaptive gate should re-solve
through it, as in a deployment.
"""

from __future__ import annotations

import ctypes
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from solver.quantities import DEFAULT_IDLE_POWER_W, DEFAULT_WEIGHT


from solver.model import ServiceProfile
from solver.slo import SloTarget

__all__ = ["SidecarProcess", "SidecarSpec", "SolverProcess", "scaled_profile", "write_profile_csv"]

_LISTENING = re.compile(r"sidecar listening on (\S+):(\d+)")
_SOLVER_LISTENING = re.compile(r"smdp solver listening on (\S+):(\d+)")
_CONTROL = re.compile(r"control API on port (\d+)")


def scaled_profile(profile: ServiceProfile, scale: float) -> ServiceProfile:
    """The profile of a server ``scale`` times slower at the same power: times and energies x scale."""
    if not scale > 0:
        raise ValueError(f"time scale must be > 0, got {scale!r}")
    return ServiceProfile(
        mean_s=profile.mean_s * scale,
        energy_j=profile.energy_j * scale,
        cv=profile.cv,
        interpolated=profile.interpolated,
        source=f"{profile.source} x{scale:g}" if profile.source else f"x{scale:g}",
    )


def write_profile_csv(profile: ServiceProfile, path: Path) -> Path:
    """Every batch size written out (no interpolation left to the reader)."""
    rows = ["batch_size,mean_service_s,batch_energy_j,service_cv"]
    for b in range(1, profile.max_batch + 1):
        rows.append(f"{b},{profile.mean_s[b - 1]!r},{profile.energy_j[b - 1]!r},{profile.cv[b - 1]!r}")
    path.write_text("\n".join(rows) + "\n")
    return path


@dataclass(frozen=True)
class SidecarSpec:
    """One gate contender's sidecar settings (passed to ``smdp serve`` as flags)."""

    policy: str
    max_batch: int
    profile_csv: Path | None = None
    rate_rps: float | None = None
    weight: float = DEFAULT_WEIGHT
    idle_power_w: float = DEFAULT_IDLE_POWER_W
    max_queue: int = 4096
    adaptive: bool = True
    """smdp: re-solve for the measured rate (False: keep the policy solved for rate_rps)."""
    solver_url: str | None = None
    """host:port of a shared ``smdp solver-serve`` the adaptive gate re-solves through (None: in-process)."""
    data_plane: str = "auto"
    """``smdp serve --data-plane``: python, or native (the C++ smdp-gate carries the requests)."""
    long_run_window_s: float | None = None
    """``smdp serve --long-run-window``: None = the sidecar's default; 0 = solve every regime with w as is."""
    slo: SloTarget | None = None
    """``smdp serve --slo-quantile q --slo-latency D [--slo-margin m]`` (the adaptive smdp gate serves that SLO)."""
    max_wait_s: float | None = None
    """``smdp serve --max-wait``: the gate's max-wait guard, seconds (None: the sidecar's default)."""
    arrivals: str | None = None
    """``smdp serve --arrivals``: a fitted arrival model the adaptive gate starts from (None: none)."""
    group_hold_s: float | None = None
    """``smdp serve --group-hold``: the gate's hold for the rest of a group, seconds (None: the sidecar's default)."""
    slo_bound: str = "stated"
    """``smdp serve --slo-bound``: best_delay derives the SLO's D from the model (``slo.latency_s`` unused)."""
    slo_direct_extra_s: float | None = None
    """``smdp serve --slo-direct-extra`` with best_delay: what Triton's answers carry beyond the model served
    directly (None: the sidecar's default, the margin)."""
    slo_catch_share: float | None = None
    """``smdp serve --slo-catch-share`` with best_delay (None: the sidecar's default)."""

    def flags(self) -> list[str]:
        out = ["--policy", self.policy, "--max-batch", str(self.max_batch), "--weight", repr(float(self.weight)),
               "--idle-power", repr(float(self.idle_power_w)), "--max-queue", str(self.max_queue),
               "--control-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
        if not self.adaptive:
            out.append("--fixed")
        if self.profile_csv is not None:
            out += ["--profile", str(self.profile_csv)]
        if self.rate_rps is not None:
            out += ["--rate", repr(float(self.rate_rps))]
        if self.solver_url is not None:
            out += ["--solver", self.solver_url]
        out += ["--data-plane", self.data_plane]
        if self.max_wait_s is not None:
            out += ["--max-wait", repr(float(self.max_wait_s))]
        if self.arrivals is not None:
            out += ["--arrivals", self.arrivals]
        if self.group_hold_s is not None:
            out += ["--group-hold", repr(float(self.group_hold_s))]
        if self.long_run_window_s is not None:
            out += ["--long-run-window", repr(float(self.long_run_window_s))]
        if self.slo is not None:
            out += ["--slo-quantile", repr(self.slo.quantile)]
            out += (["--slo-bound", "best_delay"] if self.slo_bound == "best_delay"
                    else ["--slo-latency", repr(self.slo.latency_s)])
            if self.slo.margin_s > 0:
                out += ["--slo-margin", repr(self.slo.margin_s)]
            if self.slo_bound == "best_delay" and self.slo_direct_extra_s is not None:
                out += ["--slo-direct-extra", repr(float(self.slo_direct_extra_s))]
            if self.slo_bound == "best_delay" and self.slo_catch_share is not None:
                out += ["--slo-catch-share", repr(float(self.slo_catch_share))]
        return out


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: SIGTERM the sidecar if the bench dies, even by SIGKILL, so nothing is left behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _ServiceProcess:
    """A ``python -m smdp.cli ...`` child that prints its address when ready; ``stop()`` (or exit) ends it."""

    what = "service"
    _ready = _LISTENING

    def __init__(self, *, log_path: Path | None = None, startup_timeout_s: float = 60.0) -> None:
        self.log_path = log_path or Path(tempfile.mkstemp(prefix=f"smdp-{self.what}.", suffix=".log")[1])
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.control_url: str | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self):
        cmd = [sys.executable, "-m", "smdp.cli", *self.command()]
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                          start_new_session=True, cwd=Path(__file__).resolve().parent.parent,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()
        try:
            self.url = self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.startup_timeout_s
        buf = b""
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=0.2):
                    chunk = os.read(self._proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    buf += chunk
                    text = buf.decode(errors="replace")
                    m = self._ready.search(text)
                    if m and "\n" in text[m.end():]:
                        host = "127.0.0.1" if m.group(1) in ("0.0.0.0", "") else m.group(1)
                        c = _CONTROL.search(text)
                        self.control_url = f"127.0.0.1:{c.group(1)}" if c else None
                        return f"{host}:{m.group(2)}"
                elif self._proc.poll() is not None:
                    break
        finally:
            sel.close()
        code = self._proc.poll()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.what} ({' '.join(self.command())}) did not start "
                           f"(exit code {code}); log {self.log_path}:\n{tail}")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SidecarProcess(_ServiceProcess):
    """``smdp serve`` on a free port in front of ``triton_url``; ``stop()`` (or exit) ends it."""

    what = "sidecar"
    _ready = _LISTENING

    def __init__(self, triton_url: str, spec: SidecarSpec, *, log_path: Path | None = None,
                 startup_timeout_s: float = 60.0) -> None:
        super().__init__(log_path=log_path, startup_timeout_s=startup_timeout_s)
        self.triton_url = triton_url
        self.spec = spec

    def command(self) -> list[str]:
        return ["serve", "--listen", "127.0.0.1:0", "--triton", self.triton_url, "--log-level", "WARNING",
                *self.spec.flags()]


class SolverProcess(_ServiceProcess):
    """``smdp solver-serve`` on a free port (the shared solver service); ``stop()`` (or exit) ends it."""

    what = "solver"
    _ready = _SOLVER_LISTENING

    def __init__(self, *, workers: int = 2, log_path: Path | None = None, startup_timeout_s: float = 60.0) -> None:
        super().__init__(log_path=log_path, startup_timeout_s=startup_timeout_s)
        self.workers = workers

    def command(self) -> list[str]:
        return ["solver-serve", "--listen", "127.0.0.1:0", "--workers", str(self.workers)]
