#!/bin/sh
# The system packages the deploy tests' second hosts need, installed as root where apt-get is:
# sshd in a network namespace (openssh-server, iproute2) and an aarch64 board run through
# qemu-user (qemu-user-static, binfmt-support, debootstrap, debian-archive-keyring). Where they
# cannot be installed, one line says which tests will be skipped; this never fails the build.
set -u
need=""
[ -x /usr/sbin/sshd ] || need="$need openssh-server"
command -v ssh >/dev/null 2>&1 || need="$need openssh-client"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v debootstrap >/dev/null 2>&1 || need="$need debootstrap"
[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || command -v qemu-aarch64-static >/dev/null 2>&1 \
  || need="$need qemu-user-static"
command -v update-binfmts >/dev/null 2>&1 || need="$need binfmt-support"
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need="$need debian-archive-keyring"
[ -n "$need" ] || exit 0

if [ "$(id -u)" != 0 ]; then
  echo "deploy tests: the ssh and aarch64 device hosts will be skipped (not root; they need root and:$need)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "deploy tests: the ssh and aarch64 device hosts will be skipped (no apt-get to install$need)"
  exit 0
fi
# qemu-user-static registers its interpreters with binfmt_misc when installed: mount it first.
[ -e /proc/sys/fs/binfmt_misc/register ] \
  || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
log=${TMPDIR:-/tmp}/netadapt-system-deps.log
echo "deploy tests: installing$need (log: $log)"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends $need; } >"$log" 2>&1; then
  echo "deploy tests: apt-get install$need failed (see $log); the tests that need them will be skipped"
fi
exit 0
