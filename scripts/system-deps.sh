#!/usr/bin/env bash
# Install the distribution packages the test suite uses, when they are missing.
#   PostgreSQL: the PostgreSQL half of the store tests (a throwaway cluster per test run).
# Needs root and apt-get (Debian/Ubuntu); anywhere else it says what it skipped, and the
# tests that need a missing package skip themselves with a line saying so.
set -u
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || missing+=(postgresql)
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
