#!/usr/bin/env bash
# Install the distribution packages the test suite uses, when they are missing.
#   PostgreSQL: the PostgreSQL half of the store tests (a throwaway cluster per test run).
#   iproute2, iptables: the chaos suite (`make chaos`: network namespaces, veth pairs, tc,
#   iptables rules inside the namespaces).
#   promtool (Debian's prometheus package): checks the /metrics output (tests/test_metrics.py).
#   bubblewrap: `builder --sandbox` and its tests (tests/test_sandbox.py).
#   Chromium: the headless-browser test of the dashboard (tests/test_browser.py).
#   Nix (Debian's nix-bin, Nix 2.8): the Nix build tests (tests/test_nix.py), with chroot
#   stores under the test's temporary directory; the suite sets `build-users-group =` for
#   them itself (tests/conftest.py).  A real Nix set-up for a builder running as root (or a
#   nix-daemon) also needs the `nixbld` group and its build users, which nix-bin alone does
#   not create: Debian's nix-setup-systemd does, so it is installed too.
# Needs root and apt-get (Debian/Ubuntu); anywhere else it says what it skipped, and the
# tests that need a missing package skip themselves with a line saying so.
set -u
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || missing+=(postgresql)
command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v nix-store >/dev/null 2>&1 || missing+=(nix-bin)
getent group nixbld >/dev/null 2>&1 || missing+=(nix-setup-systemd)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: not installing ${missing[*]} (needs root and apt-get); the tests that need them will be skipped" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || echo "system-deps: apt-get update failed; trying the cached lists" >&2
# One package at a time: one that cannot be installed here (not in this release, a post-install
# script that needs systemd) must not keep the others out.
for package in "${missing[@]}"; do
  apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1 \
    || echo "system-deps: could not install $package; the tests that need it will be skipped" >&2
done
exit 0
