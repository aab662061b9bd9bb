#!/usr/bin/env bash
# Stages the build contexts of the no-pull images that deploy/test.sh runs.
#
# A machine with Docker but no registry has no base image to start FROM, so
# these images are `FROM scratch` with a root filesystem assembled here from
# this machine's own files:
#
#   daemon   target/release/minibatchd (debug info stripped), exactly the shared
#            libraries `ldd` lists for it, the dynamic loader, an /etc/passwd
#            with the non-root user minibatchd (10001), /tmp.
#   trainer  this machine's CPython (sys.base_prefix of $PYTHON, relocated to
#            /usr/local, stdlib pruned of tests, tkinter, idlelib, ...),
#            numpy, grpcio, protobuf and ./clients/python installed with
#            `pip install --target` (versions pinned by requirements-test.txt),
#            examples/train_logreg.py as /app/train_logreg.py (and
#            deploy/local/attach_check.py, test.sh's attach check), the shared
#            libraries `ldd` lists for python and every extension module, and
#            the non-root user trainer (10001).
#
# Usage: deploy/local/stage.sh [daemon|trainer|all]     (default: all)
# Output: $STAGE_DIR (default target/deploy-local)/{daemon,trainer}/, each a
# docker build context holding a Dockerfile and rootfs/.
# Environment: MINIBATCHD_BIN (default target/release/minibatchd),
# PYTHON (the interpreter to stage; default .venv/bin/python, else python3).
# The images only run on a machine with this machine's CPU architecture, and
# the daemon image only with a binary built for it: they are for testing the
# deployment here, the top-level Dockerfile is the one to ship.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
WHAT=${1:-all}
STAGE_DIR=${STAGE_DIR:-$REPO/target/deploy-local}
BIN=${MINIBATCHD_BIN:-$REPO/target/release/minibatchd}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
APP_UID=10001

say() { printf 'stage: %s\n' "$*" >&2; }
die() { printf 'stage: error: %s\n' "$*" >&2; exit 1; }

# Base files every image needs: the user, name lookup order, a world-writable
# /tmp. Docker itself provides /etc/hosts and /etc/resolv.conf at run time.
base_rootfs() { # ROOT USER
  local root=$1 user=$2
  mkdir -p "$root/etc" "$root/tmp" "$root/usr/local/bin"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\n%s:x:%d:%d:%s:/tmp:/sbin/nologin\n' \
    "$user" "$APP_UID" "$APP_UID" "$user" >"$root/etc/passwd"
  printf 'root:x:0:\n%s:x:%d:\n' "$user" "$APP_UID" >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
}

# add_libs ROOT ELF...: copies into ROOT, at the path `ldd` prints, every
# shared library (and the dynamic loader) that the ELF files need and that
# ROOT does not hold yet. Libraries an ELF finds inside ROOT itself (numpy's
# bundled OpenBLAS, found through $ORIGIN) are already there.
add_libs() {
  local root=$1 elf out lib dest
  shift
  for elf in "$@"; do
    out=$(ldd "$elf" 2>&1) || die "ldd $elf: $out"
    if grep -q 'not found' <<<"$out"; then die "$elf needs a library this machine lacks:
$out"; fi
    while read -r lib; do
      case $lib in "" | "$root"/*) continue ;; esac
      # A library staged by name into a default directory (libpython) wins
      # over the absolute RUNPATH it was found through here.
      if [ -e "$root/usr/lib/x86_64-linux-gnu/${lib##*/}" ]; then continue; fi
      dest=$root$lib
      [ -e "$dest" ] && continue
      mkdir -p "$(dirname "$dest")"
      cp -L "$lib" "$dest"
    done < <(sed -nE 's/^[[:space:]]*([^ ]+ => )?(\/[^ ]+) \(0x[0-9a-f]+\)$/\2/p' <<<"$out")
  done
}

stage_daemon() {
  local ctx=$STAGE_DIR/daemon root
  root=$ctx/rootfs
  [ -x "$BIN" ] || die "no daemon binary at $BIN: build it first (cargo build --release --locked)"
  say "daemon: $BIN"
  rm -rf "$ctx"
  mkdir -p "$ctx"
  base_rootfs "$root" minibatchd
  mkdir -p "$root/data"
  # Debug info only (symbols stay, so backtraces still name functions): the
  # release profile keeps line tables, which are most of the binary's bytes.
  objcopy --strip-debug "$BIN" "$root/usr/local/bin/minibatchd"
  add_libs "$root" "$root/usr/local/bin/minibatchd"
  cp deploy/local/Dockerfile.daemon "$ctx/Dockerfile"
  say "daemon: $(du -sh "$root" | cut -f1) in $ctx"
}

# Stdlib parts a headless trainer never imports (tests alone are 120 MB).
PY_PRUNE=(
  site-packages test idlelib tkinter turtledemo turtle.py ensurepip lib2to3
  pydoc_data distutils venv 'config-*'
  unittest/test ctypes/test sqlite3/test tkinter/test
  lib-dynload/_tkinter'*' lib-dynload/nis'*' lib-dynload/_curses'*'
  lib-dynload/readline'*' lib-dynload/_dbm'*' lib-dynload/_gdbm'*'
  lib-dynload/_crypt'*' lib-dynload/_test'*' lib-dynload/xxlimited'*'
  lib-dynload/_xxtestfuzz'*' lib-dynload/_ctypes_test'*' lib-dynload/xxsubtype'*'
)

stage_trainer() {
  local ctx=$STAGE_DIR/trainer root base ver sp cons f
  root=$ctx/rootfs
  [ -f examples/train_logreg.py ] || die "examples/train_logreg.py is missing"
  [ -f clients/python/pyproject.toml ] || die "clients/python/pyproject.toml is missing"
  read -r base ver < <("$PYTHON" -c 'import sys; print(sys.base_prefix, "%d.%d" % sys.version_info[:2])')
  say "trainer: python $ver from $base"
  rm -rf "$ctx"
  mkdir -p "$ctx"
  base_rootfs "$root" trainer
  mkdir -p "$root/usr/local/lib" "$root/usr/lib/x86_64-linux-gnu" "$root/app"

  # The interpreter, relocated: python finds its stdlib from its own path
  # (/usr/local/bin/python3 -> /usr/local/lib/pythonX.Y) and libpython in the
  # loader's default directory (its RUNPATH names this machine's prefix).
  cp -L "$base/bin/python$ver" "$root/usr/local/bin/python$ver"
  ln -s "python$ver" "$root/usr/local/bin/python3"
  ln -s "python$ver" "$root/usr/local/bin/python"
  for f in "$base"/lib/libpython"$ver"*.so.1.0; do
    objcopy --strip-debug "$f" "$root/usr/lib/x86_64-linux-gnu/${f##*/}"
  done
  local excl=()
  for f in "${PY_PRUNE[@]}"; do excl+=("--exclude=python$ver/$f"); done
  tar -C "$base/lib" "${excl[@]}" --exclude=__pycache__ -cf - "python$ver" |
    tar -C "$root/usr/local/lib" -xf -
  find "$root/usr/local/lib/python$ver/lib-dynload" -name '*.so' -exec strip --strip-debug {} +

  # Third-party packages, at the versions the tests use.
  sp=$root/usr/local/lib/python$ver/site-packages
  cons=$ctx/constraints.txt
  grep -E '^[A-Za-z0-9_.-]+==' requirements-test.txt >"$cons" || true
  say "trainer: pip install --target (numpy, grpcio, protobuf, clients/python)"
  "$PYTHON" -m pip install --disable-pip-version-check -q --no-compile \
    --prefer-binary --target "$sp" -c "$cons" numpy grpcio protobuf ./clients/python
  rm -f "$cons"
  # The client's native transport, as scripts/test.sh built and tested it for
  # this same interpreter: copied in, not rebuilt. Without it the trainer
  # uses the grpcio transport (the image works either way).
  if nat=$("$PYTHON" -c 'import minibatch_client_native as m, os; print(os.path.dirname(m.__file__))' 2>/dev/null); then
    cp -r "$nat" "$sp/"
    cp -r "$(dirname "$nat")"/minibatch_client_native-*.dist-info "$sp/"
    say "trainer: with the native transport (minibatch-client-native)"
  else
    say "trainer: minibatch-client-native is not installed here: the trainer will use the grpcio transport"
  fi
  rm -rf "${sp:?}/bin" "$sp"/*/tests "$sp"/*/*/tests "$sp"/numpy/_core/include \
    "$sp"/numpy/_pyinstaller "$sp"/numpy/f2py "$sp"/numpy/testing/_private/extbuild.py
  find "$sp" -name __pycache__ -prune -exec rm -rf {} +
  find "$sp" \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.c' -o -name '*.h' \) -delete
  find "$sp" -name '*.so*' -type f -exec sh -c 'for f; do
    if file "$f" | grep -q "with debug_info"; then strip --strip-debug "$f"; fi; done' sh {} +

  cp examples/train_logreg.py "$root/app/train_logreg.py"
  cp deploy/local/attach_check.py "$root/app/attach_check.py"

  add_libs "$root" "$root/usr/local/bin/python$ver"
  while IFS= read -r -d '' f; do add_libs "$root" "$f"; done < <(find "$root/usr/local/lib" -name '*.so*' -type f -print0)

  # Bytecode once, here: the non-root user cannot write __pycache__ at run
  # time, and unchecked-hash pycs stay valid whatever mtimes COPY gives.
  "$PYTHON" -m compileall -q -j0 --invalidation-mode unchecked-hash -s "$root" -p / \
    "$root/usr/local/lib/python$ver" "$root/app" >/dev/null
  cp deploy/local/Dockerfile.trainer "$ctx/Dockerfile"
  say "trainer: $(du -sh "$root" | cut -f1) in $ctx"
}

case $WHAT in
  daemon) stage_daemon ;;
  trainer) stage_trainer ;;
  all) stage_daemon; stage_trainer ;;
  *) die "usage: $0 [daemon|trainer|all]" ;;
esac
