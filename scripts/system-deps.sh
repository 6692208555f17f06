#!/usr/bin/env bash
# Install the distribution packages the test suite uses, when they are missing.
#   PostgreSQL: the PostgreSQL half of the store tests (a throwaway cluster per test run).
#   iproute2, iptables: the chaos suite (`make chaos`: network namespaces, veth pairs, tc,
#   iptables rules inside the namespaces).
#   promtool (Debian's prometheus package): checks the /metrics output (tests/test_metrics.py).
#   Chromium: the headless-browser test of the dashboard (tests/test_browser.py).
#   Nix (Debian's nix-bin, Nix 2.8): the Nix build tests (tests/test_nix.py), in single-user
#   mode with chroot stores under the test's temporary directory.
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
command -v nix-store >/dev/null 2>&1 || missing+=(nix-bin)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: not installing ${missing[*]} (needs root and apt-get); the tests that need them will be skipped" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || echo "system-deps: could not install ${missing[*]}; the tests that need them will be skipped" >&2
exit 0
