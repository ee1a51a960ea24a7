"""The shell script a deploy runs on the device, and the parsing of what it prints.

One POSIX `sh` script, sent on ssh's standard input (`ssh … sh -s`) so that nothing secret
appears on a command line: a preamble of quoted settings, a library of functions, and the steps
to run. Termux (Android) gets its Python packages from `pkg` (the PyPI manylinux wheels do not
install there) in a venv that sees them; any other Linux gets a plain venv filled by pip.

The script reports on stdout as `netadapt: key=value` lines and fails with
`netadapt-error: message` on stderr and exit status 3 (ssh itself fails with 255).

Layout on the device, under the remote directory (`~/netadapt-device` by default):
`app/` the bundle, `venv/` the Python environment, `token` (0600), `daemon.pid`, `daemon.port`,
`daemon.log`, `daemon.env` (how it was started), `install.log`.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RemoteSettings", "RemoteReport", "render_script", "parse_report", "remote_path",
           "REMOTE_ERROR_STATUS", "STEPS", "TERMUX_PACKAGES"]

REMOTE_ERROR_STATUS = 3
# Built for Termux by its maintainers: pip cannot install these there.
TERMUX_PACKAGES = ("python", "python-numpy", "python-grpcio", "python-onnxruntime")
STEPS = ("probe", "read_token", "unpack", "install", "write_token", "start", "stop", "status",
         "log_tail")

_LIBRARY = r"""
umask 077
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
case $NA_DIR in "~") NA_DIR=$HOME ;; "~/"*) NA_DIR=$HOME/${NA_DIR#"~/"} ;; esac
APP=$NA_DIR/app; VENV=$NA_DIR/venv; TOKEN=$NA_DIR/token; PIDFILE=$NA_DIR/daemon.pid
PORTFILE=$NA_DIR/daemon.port; LOG=$NA_DIR/daemon.log; ENVFILE=$NA_DIR/daemon.env
ILOG=$NA_DIR/install.log; STAMP=$VENV/.netadapt-requirements

say() { printf 'netadapt: %s\n' "$*"; }
note() { printf 'netadapt-note: %s\n' "$*"; }
tail_of() { [ -f "$1" ] && tail -n "${2:-20}" "$1" | sed 's/^/  | /' >&2; return 0; }
die() { printf 'netadapt-error: %s\n' "$*" >&2; exit 3; }

is_termux() {
  case ${PREFIX:-} in */com.termux/*) return 0 ;; esac
  [ -d /data/data/com.termux/files/usr/bin ] && command -v pkg >/dev/null 2>&1
}

# The daemon's pid if the pid file names a live daemon (not a reused pid, not a zombie).
# Alive and not a zombie (a child that exited stays one until this shell waits for it).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  if [ -r "/proc/$1/stat" ]; then
    [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ] || return 1
  fi
}

daemon_pid() {
  [ -f "$PIDFILE" ] || return 1
  p=$(cat "$PIDFILE" 2>/dev/null) || return 1
  case $p in '' | *[!0-9]*) return 1 ;; esac
  kill -0 "$p" 2>/dev/null || return 1
  if [ -r "/proc/$p/cmdline" ]; then
    tr '\000' ' ' <"/proc/$p/cmdline" | grep -q device_server || return 1
  fi
  echo "$p"
}

env_current() { [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$NA_REQ_SHA" ]; }

# What the wheels must fit: the Python the venv is built from, and the C library.
probe_python() {
  p=${NA_PYTHON:-$(command -v python3 || command -v python)} || return 1
  "$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

step_probe() {
  if is_termux; then say platform=termux; else say platform=linux; fi
  say "machine=$(uname -m)"
  if v=$(probe_python); then say "python=$v"; fi
  if v=$(getconf GNU_LIBC_VERSION 2>/dev/null); then say "libc=$v"; fi
  if env_current; then say env=current; else say env=stale; fi
  if [ -s "$TOKEN" ]; then say token=present; else say token=absent; fi
  if p=$(daemon_pid); then say "pid=$p"; fi
}

step_read_token() { [ -s "$TOKEN" ] && say "token_value=$(cat "$TOKEN")"; }

step_unpack() {
  mkdir -p "$NA_DIR" && chmod 700 "$NA_DIR" || die "cannot create $NA_DIR"
  rm -rf "$APP.new" && mkdir -p "$APP.new" || die "cannot write $APP.new"
  base64 -d <"$NA_DIR/bundle.b64" >"$NA_DIR/bundle.tar.gz" \
    && tar -xzf "$NA_DIR/bundle.tar.gz" -C "$APP.new" || die "cannot unpack the bundle"
  rm -rf "$APP.old" "$NA_DIR/bundle.b64" "$NA_DIR/bundle.tar.gz"
  if [ -d "$APP" ]; then mv "$APP" "$APP.old"; fi
  mv "$APP.new" "$APP" && rm -rf "$APP.old" || die "cannot replace $APP"
  say "bundle=$(sed -n 's/^sources //p' "$APP/BUNDLE")"
}

find_python() {
  if [ -n "$NA_PYTHON" ]; then PY=$NA_PYTHON
  else
    PY=$(command -v python3 || command -v python) \
      || die "no python3 on the device: install Python >= 3.11 with its venv module"
  fi
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PY is not Python >= 3.11; pass --python with one that is"
}

pip_install() {
  set -- install -r "$APP/requirements-device.txt"
  if [ -d "$NA_DIR/wheels" ]; then set -- "$@" --no-index --find-links "$NA_DIR/wheels"; fi
  if [ -n "${CONSTRAINTS:-}" ]; then set -- "$@" -c "$CONSTRAINTS"; fi
  note "installing Python packages (log: $ILOG)"
  "$VENV/bin/python" -m pip "$@" >>"$ILOG" 2>&1 || {
    tail_of "$ILOG" 25
    die "pip install failed on the device (see $ILOG; without internet there, pass --wheelhouse)"
  }
  echo "$NA_REQ_SHA" >"$STAMP"
  rm -rf "$NA_DIR/wheels"
  say env=installed
}

install_termux() {
  missing=
  for p in $NA_TERMUX_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    note "pkg install$missing (log: $ILOG)"
    pkg install -y $missing >>"$ILOG" 2>&1 || { tail_of "$ILOG"; die "pkg install$missing failed"; }
  fi
  env_current && { say env=current; return 0; }
  PY=${NA_PYTHON:-python}
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV" >>"$ILOG" 2>&1 \
      || { tail_of "$ILOG"; die "cannot create a virtual environment with $PY"; }
  fi
  # Pin what pkg installed, so that pip never tries to build replacements from source.
  CONSTRAINTS=$NA_DIR/constraints.txt
  "$VENV/bin/python" -c 'import grpc, numpy, onnxruntime as o; v = grpc.__version__
print(f"grpcio=={v}\ngrpcio-health-checking=={v}\ngrpcio-reflection=={v}\ngrpcio-status=={v}")
print(f"numpy=={numpy.__version__}\nonnxruntime=={o.__version__}")' >"$CONSTRAINTS" \
    || die "the Termux packages do not import: try pkg upgrade"
  pip_install
}

install_venv() {
  env_current && { say env=current; return 0; }
  find_python
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" >>"$ILOG" 2>&1 || {
      tail_of "$ILOG"
      die "cannot create a virtual environment with $PY (Debian/Ubuntu: apt install python3-venv)"
    }
  fi
  pip_install
}

step_install() {
  mkdir -p "$NA_DIR" && : >"$ILOG" || die "cannot write $NA_DIR"
  if [ -f "$NA_DIR/wheels.tar" ]; then
    rm -rf "$NA_DIR/wheels" && mkdir -p "$NA_DIR/wheels" \
      && tar -xf "$NA_DIR/wheels.tar" -C "$NA_DIR/wheels" && rm -f "$NA_DIR/wheels.tar" \
      || die "cannot unpack the wheelhouse"
  fi
  if is_termux; then install_termux; else install_venv; fi
}

step_write_token() {
  [ -n "$NA_TOKEN" ] || die "no token to write"
  mkdir -p "$NA_DIR" || die "cannot create $NA_DIR"
  printf '%s\n' "$NA_TOKEN" >"$TOKEN.tmp" && chmod 600 "$TOKEN.tmp" && mv "$TOKEN.tmp" "$TOKEN" \
    || die "cannot write $TOKEN"
}

stop_daemon() {
  p=$(daemon_pid) || { rm -f "$PIDFILE" "$PORTFILE"; return 0; }
  kill -TERM "$p" 2>/dev/null
  i=0
  while daemon_pid >/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 150 ]; then kill -KILL "$p" 2>/dev/null; sleep 1; break; fi
    sleep 0.1
  done
  rm -f "$PIDFILE" "$PORTFILE"
  say "stopped=$p"
}

step_start() {
  [ -x "$VENV/bin/python" ] && [ -d "$APP" ] || die "nothing installed in $NA_DIR: deploy first"
  [ -s "$TOKEN" ] || die "no token in $TOKEN: deploy first"
  stop_daemon
  if [ -f "$LOG" ]; then mv "$LOG" "$LOG.1"; fi
  cd "$APP" || die "cannot enter $APP"
  set -- --host "$NA_BIND" --port "$NA_PORT" --threads "$NA_THREADS" --token-file "$TOKEN" \
    --port-file "$PORTFILE"
  if [ -n "$NA_CPUS" ]; then set -- "$@" --cpus "$NA_CPUS"; fi
  PYTHONPATH=$APP PYTHONUNBUFFERED=1 nohup "$VENV/bin/python" -m device_server serve "$@" \
    </dev/null >>"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  printf 'bind=%s\nport=%s\nthreads=%s\ncpus=%s\n' "$NA_BIND" "$NA_PORT" "$NA_THREADS" \
    "$NA_CPUS" >"$ENVFILE"
  if is_termux && command -v termux-wake-lock >/dev/null 2>&1; then
    termux-wake-lock && say wake_lock=held
  fi
  # The daemon writes its port file once it serves; it may exit first (port in use, bad bind).
  i=0
  started=$(cat "$PIDFILE")
  while [ ! -s "$PORTFILE" ]; do
    # Not daemon_pid: until nohup has exec'd Python, the cmdline does not say device_server.
    alive "$started" || { tail_of "$LOG"; die "the daemon exited before serving (log: $LOG)"; }
    i=$((i + 1))
    [ "$i" -gt $((NA_START_TIMEOUT_S * 5)) ] && {
      tail_of "$LOG"
      die "the daemon did not serve within $NA_START_TIMEOUT_S s (log: $LOG)"
    }
    sleep 0.2
  done
  say "pid=$(cat "$PIDFILE")"
}

step_stop() {
  stop_daemon
  if is_termux && command -v termux-wake-unlock >/dev/null 2>&1; then termux-wake-unlock; fi
}

step_status() {
  if p=$(daemon_pid); then say state=running; say "pid=$p"; else say state=stopped; fi
  if [ -f "$ENVFILE" ]; then sed 's/^/netadapt: /' "$ENVFILE"; fi
}

step_log_tail() { if [ -f "$LOG" ]; then tail -n 20 "$LOG" | sed 's/^/netadapt-log: /'; fi; }
"""


@dataclass(frozen=True)
class RemoteSettings:
    """What the script needs to know; every value reaches the shell quoted."""

    remote_dir: str = "~/netadapt-device"
    bind: str = "0.0.0.0"
    port: int = 50051
    threads: int = 1
    cpus: str = ""                      # the daemon's --cpus (e.g. "4-7"); empty: not pinned
    python: str = ""                    # empty: python3 from the device's PATH
    requirements_sha256: str = ""
    token: str = ""                     # only for the write_token step
    start_timeout_s: int = 120          # importing onnxruntime on a phone takes a while


@dataclass(frozen=True)
class RemoteReport:
    """The `key=value` lines a run printed (the last value wins), its notes and log lines."""

    values: dict[str, str]
    notes: tuple[str, ...] = ()
    log: tuple[str, ...] = ()

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    def number(self, key: str) -> int | None:
        value = self.values.get(key, "")
        return int(value) if value.isdigit() else None


def remote_path(path: str) -> str:
    """`path` for a POSIX shell on the device, with a leading `~` meaning the login's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def render_script(steps: Sequence[str], settings: RemoteSettings, bundle: bytes | None = None
                  ) -> str:
    """The script that runs `steps` (names from STEPS) in order, stopping at the first failure.

    Args:
        bundle: the tar.gz to unpack; required by the `unpack` step, carried in the script
            as base64 so that one ssh call does the whole deploy.
    """
    unknown = [s for s in steps if s not in STEPS]
    assert not unknown, f"unknown remote steps {unknown}; expected names from {STEPS}"
    assert ("unpack" in steps) == (bundle is not None), "the unpack step needs the bundle"
    settings_lines = {
        "NA_DIR": settings.remote_dir,
        "NA_BIND": settings.bind,
        "NA_PORT": str(settings.port),
        "NA_THREADS": str(settings.threads),
        "NA_CPUS": settings.cpus,
        "NA_PYTHON": settings.python,
        "NA_REQ_SHA": settings.requirements_sha256,
        "NA_TOKEN": settings.token,
        "NA_START_TIMEOUT_S": str(int(settings.start_timeout_s)),
        "NA_TERMUX_PACKAGES": " ".join(TERMUX_PACKAGES),
    }
    parts = ["set -u"]
    parts += [f"{name}={shlex.quote(value)}" for name, value in settings_lines.items()]
    parts.append(_LIBRARY)
    if bundle is not None:
        encoded = base64.encodebytes(bundle).decode()
        parts.append('mkdir -p "$NA_DIR" || die "cannot create $NA_DIR"')
        parts.append(f"cat >\"$NA_DIR/bundle.b64\" <<'NETADAPT_BUNDLE_END'\n{encoded}"
                     f"NETADAPT_BUNDLE_END")
    parts += [f"step_{step}" for step in steps]
    return "\n".join(parts) + "\n"


def parse_report(stdout: str) -> RemoteReport:
    values: dict[str, str] = {}
    notes: list[str] = []
    log: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("netadapt: "):
            key, _, value = line[len("netadapt: "):].partition("=")
            values[key.strip()] = value.strip()
        elif line.startswith("netadapt-note: "):
            notes.append(line[len("netadapt-note: "):])
        elif line.startswith("netadapt-log: "):
            log.append(line[len("netadapt-log: "):])
    return RemoteReport(values, tuple(notes), tuple(log))
