#!/bin/sh
# The Debian/Ubuntu packages the test suite needs beyond Python, installed when missing (README's test command and
# .ci/run call this): postgresql (tests/pg.py starts a throwaway server for the Supabase store's tests), nginx
# (tests/test_nginx.py runs the shipped config in front of the service) and chromium (tests/test_playground.py
# drives /playground headless). As root it installs directly; otherwise through sudo.
set -eu
missing=""
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests: install these packages first (not a Debian/Ubuntu system):$missing" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
# Each step says what it does before it starts, and apt's own lines (Get:, Unpacking, Setting up) show it working:
# on a fresh machine this downloads a few hundred megabytes and can take minutes.
echo "tests: installing$missing with apt-get (a few minutes on a fresh machine)" >&2
echo "tests: apt-get update: refreshing the package lists" >&2
$sudo apt-get update -q
echo "tests: apt-get install$missing: downloading, unpacking and setting up (the longest step)" >&2
# shellcheck disable=SC2086  # the list is meant to split into package names
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q $missing
echo "tests: installed$missing" >&2
