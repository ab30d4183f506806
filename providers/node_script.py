"""What runs on the node during a bootstrap: the fixed command of the setup SSH session (:data:`LOADER`), the
bootstrap script it runs (:func:`bootstrap_script`), and the marker lines that script prints for
:mod:`cloudmodal.providers.node_bootstrap` to read.

The script reads, on its stdin: the worker's environment as ``KEY=BASE64(VALUE)`` lines (by bash's ``read`` builtin,
handed to the worker with ``export`` only in the subshell that ``exec``s it), then the tarball of
:mod:`cloudmodal.providers.node_package`. It unpacks cloudmodal (cached per content hash), sets up the image
(cached per image hash), and starts the worker detached. Its text holds no secret.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from collections.abc import Mapping, Sequence

from cloudmodal import image_render

# Lines the bootstrap script prints for node_bootstrap to read.
BEGIN_LINE = "CLOUDMODAL-BOOTSTRAP begin"
TUNNEL_UP_LINE = "CLOUDMODAL-TUNNEL up"
IMAGE_LINE = re.compile(r"^CLOUDMODAL-IMAGE (cached|built)\b", re.MULTILINE)
STARTED_LINE = re.compile(r"^CLOUDMODAL-WORKER started pid=(\d+) log=(.*)$", re.MULTILINE)

# The only command an SSH session runs on the node: read a length, that many bytes of script, and run the
# script with the rest of stdin (the environment and the package). It holds no data.
LOADER = (
    "bash -c 'set -e; IFS= read -r n; d=$(mktemp -d); umask 077; "
    'head -c "$n" >"$d/bootstrap.sh"; exec bash "$d/bootstrap.sh" "$d"\''
)


def bootstrap_script(
    *,
    image_hash: str,
    setup: str,
    deps: Sequence[str],
    python_for_deps: bool,
    pkg_sha: str,
    pkg_size: int,
    key: str,
    argv: Sequence[str],
    image_env: Mapping[str, str],
    workdir: str | None,
    startup_check_s: float,
    src_sha: str | None = None,
    src_size: int = 0,
    attached: bool = False,
) -> str:
    """The script the loader runs on the node. It reads the worker's environment and the package from its
    stdin; everything in its text is public (no secret is ever part of it).

    ``src_sha``/``src_size``: a second tarball after cloudmodal's, the user's ``add_local_python_source``
    packages, unpacked once per hash and put on ``PYTHONPATH`` after cloudmodal. ``attached``: the process is
    started in the foreground of this SSH session instead of detached, its stdin the rest of the session's
    (a sandbox host reads its configuration line there and ends its sandbox when the session closes)."""
    venv = image_render.venv_dir(image_hash)
    deps_sha = hashlib.sha256("\n".join(deps).encode()).hexdigest()[:12]
    if deps:
        installer = (
            '"$venv/bin/python" -m pip install --quiet'
            if python_for_deps
            else 'uv pip install --python "$venv/bin/python"'
        )
        deps_step = f'PATH="$HOME/.local/bin:$PATH" {installer} {shlex.join(deps)}'
    else:
        deps_step = ":"
    image_exports = "\n".join(f"    export {k}={shlex.quote(v)}" for k, v in image_env.items())
    cd = f"cd {shlex.quote(workdir)}" if workdir else 'cd "$HOME"'
    setup_b64 = base64.b64encode(setup.encode()).decode()
    prepare = f"""\
{image_exports}
    for k in "${{!wenv[@]}}"; do export "$k=${{wenv[$k]}}"; done
    export PYTHONPATH="$pkg{":$src" if src_sha else ""}${{PYTHONPATH:+:$PYTHONPATH}}"
    export CLOUDMODAL_VENV="$venv" VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
    {cd}"""
    # Detached: its own session, stdio to its log, so it outlives this SSH session.
    detached_step = f"""\
  (
{prepare}
    # The token goes on the worker's stdin (one JSON line, written by the builtin printf), not in its
    # environment, where /proc/<pid>/environ would keep showing it to the user's code after the worker drops it.
    unset CLOUDMODAL_TOKEN
    if [ -n "${{wenv[CLOUDMODAL_TOKEN]:-}}" ]; then
      export CLOUDMODAL_CREDENTIALS=stdin
      exec setsid "$venv/bin/python" {shlex.join(argv)} \
        < <(printf '{{"CLOUDMODAL_TOKEN": "%s"}}\n' "${{wenv[CLOUDMODAL_TOKEN]}}") >>"$log" 2>&1
    fi
    exec setsid "$venv/bin/python" {shlex.join(argv)} </dev/null >>"$log" 2>&1
  ) &
  local pid=$!
  echo "$pid" >"$root/workers/{key}.pid"
  sleep {startup_check_s:g}
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "the worker exited at once; the end of its log ($log):" >&2
    tail -n 40 "$log" >&2
    exit 4
  fi
  echo "CLOUDMODAL-WORKER started pid=$pid log=$log"
"""
    # Attached: in the foreground, on the rest of this session's stdin; the session ends with it.
    attached_step = f"""\
  echo "CLOUDMODAL-WORKER started pid=$$ log=$log"
  (
{prepare}
    exec "$venv/bin/python" {shlex.join(argv)} >>"$log" 2>&1
  )"""
    return f"""\
# cloudmodal node bootstrap (worker {key}, image {image_hash[:12]}); generated, do not edit.
main() {{
  set -euo pipefail
  umask 077
  rm -rf "$1"  # the loader's copy of this script (bash keeps it open)
  echo "{BEGIN_LINE}"
  local root="$HOME/.cloudmodal"
  mkdir -p "$root/pkg" "$root/images" "$root/logs" "$root/workers"

  # 1. The worker's environment: KEY=BASE64 lines up to an empty one (base64, so a value may hold newlines: a
  #    PEM key), read by the builtin `read`, decoded through a pipe and kept unexported, so no command line,
  #    file or other process sees them. The trailing `x` keeps the value's own trailing newlines.
  local -A wenv=()
  local line k v
  while IFS= read -r line; do
    [ -z "$line" ] && break
    k="${{line%%=*}}"
    case "$k" in ''|[0-9]*|*[!A-Za-z0-9_]*) echo "bad environment name in the bootstrap input" >&2; exit 2;; esac
    v="$(printf '%s' "${{line#*=}}" | base64 -d && printf x)" || {{ echo "bad environment value for $k" >&2; exit 2; }}
    wenv["$k"]="${{v%x}}"
  done

  # 2. cloudmodal itself: {pkg_size} bytes of tar.gz, unpacked once per content hash.
  local pkg="$root/pkg/{pkg_sha}"
  if [ -d "$pkg/cloudmodal" ]; then
    head -c {pkg_size} >/dev/null
  else
    local tmp
    tmp="$(mktemp -d "$root/pkg/.unpack.XXXXXX")"
    head -c {pkg_size} >"$tmp.tgz"
    echo "{pkg_sha}  $tmp.tgz" | sha256sum -c --quiet -
    tar -xzf "$tmp.tgz" -C "$tmp" && rm -f "$tmp.tgz"
    mv -T "$tmp" "$pkg" 2>/dev/null || rm -rf "$tmp"  # another bootstrap unpacked it first
  fi

{_sources_step(src_sha, src_size)}
  # 3. The image, once per image hash on this node (a lock serialises concurrent bootstraps).
  local img="$root/images/{image_hash}"
  local venv="{venv}"
  mkdir -p "$img"
  exec 9>"$img/lock"
  if command -v flock >/dev/null 2>&1; then flock 9; fi
  if [ -f "$img/done" ]; then
    echo "CLOUDMODAL-IMAGE cached {image_hash[:12]}"
  else
    echo {setup_b64} | base64 -d >"$img/setup.sh"
    if ! PYTHONPATH="$pkg" bash "$img/setup.sh" </dev/null 2>&1 | tee "$img/setup.log"; then
      echo "CLOUDMODAL-IMAGE failed {image_hash[:12]}: the image's setup exited with an error (above)" >&2
      exit 3
    fi
    touch "$img/deps-{deps_sha}" "$img/done"
    echo "CLOUDMODAL-IMAGE built {image_hash[:12]}"
  fi
  if [ ! -f "$img/deps-{deps_sha}" ]; then  # an image set up for another cloudmodal version
    {deps_step} </dev/null
    touch "$img/deps-{deps_sha}"
  fi
  exec 9>&-

  # 4. The worker. Its environment is exported only inside the subshell that becomes it.
  local log="$root/logs/worker-{key}.log"
  : >"$log"
{attached_step if attached else detached_step.rstrip()}
}}
main "$@"
"""


def _sources_step(src_sha: str | None, src_size: int) -> str:
    if not src_sha:
        return ""
    return f"""\
  # 2b. The app's add_local_python_source packages: {src_size} bytes of tar.gz, unpacked once per hash.
  local src="$root/src/{src_sha}"
  mkdir -p "$root/src"
  if [ -d "$src" ]; then
    head -c {src_size} >/dev/null
  else
    local stmp
    stmp="$(mktemp -d "$root/src/.unpack.XXXXXX")"
    head -c {src_size} >"$stmp.tgz"
    echo "{src_sha}  $stmp.tgz" | sha256sum -c --quiet -
    tar -xzf "$stmp.tgz" -C "$stmp" && rm -f "$stmp.tgz"
    mv -T "$stmp" "$src" 2>/dev/null || rm -rf "$stmp"
  fi
"""
