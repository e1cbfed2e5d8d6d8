#!/bin/sh
# README's test command, and CI's (.ci/run).  The suite runs twice, and both runs must pass:
#   1. with Debian's python3 and packages (bookworm: Python 3.11, click 8.1, rich 13.3,
#      dnspython 2.3, cryptography 38, ...), which the Debian package runs on;
#   2. in a virtualenv with the newest releases on PyPI (pip install --upgrade '.[test]'), as a
#      user who installs with pip gets them.  The virtualenv is kept between runs in
#      ${XDG_CACHE_HOME:-$HOME/.cache}/elemta-test-venv and brought up to date each time.
# Arguments go to both pytest runs (e.g. ./run-tests.sh -x -q tests/cli); without any, root
# also runs the package tests (packaging/test-deb.sh, packaging/test-rpm.sh).
set -e
cd "$(dirname "$0")"
packaging/ensure-debs.sh python3 python3-venv python3-idna python3-dnspython python3-click python3-rich \
    python3-spf python3-dkim python3-nacl python3-cryptography publicsuffix python3-pytest python3-aiosmtpd \
    python3-dnslib python3-trustme python3-prometheus-client python3-yaml python3-jsonschema python3-kubernetes \
    prometheus podman runc debootstrap docker-compose dovecot-core swaks libnet-ssleay-perl \
    libio-socket-ssl-perl sqlite3 nsd unbound ldnsutils
# nsd, unbound and ldnsutils are the DANE tests' DNSSEC testbed (tests/dnssec.py): the tests sign
# their own zones and run their own nsd and unbound on loopback ports, not the system services.

# Always Debian's interpreter: python3 on PATH may be another one (pyenv).
debian_python=/usr/bin/python3
venv="${XDG_CACHE_HOME:-$HOME/.cache}/elemta-test-venv"

seconds() { date +%s; }
took() { echo "$(( ($2 - $1) / 60 ))m$(( ($2 - $1) % 60 ))s"; }

echo "==== run 1 of 2: Debian's python3 and packages ($($debian_python --version 2>&1)) ===="
start=$(seconds)
debian=0
$debian_python -m pytest -q -p no:cacheprovider tests "$@" || debian=$?
debian_took=$(took "$start" "$(seconds)")
echo "==== run 1 of 2 (Debian's packages): exit $debian after $debian_took ===="

echo "==== run 2 of 2: virtualenv $venv, the newest releases on PyPI ===="
start=$(seconds)
pypi=0
if ! "$venv/bin/python" -c "" 2>/dev/null; then
    $debian_python -m venv --clear "$venv"
fi
# --upgrade-strategy eager: dependencies that a kept virtualenv already satisfies are
# upgraded too, not only elemta itself.
if "$venv/bin/python" -m pip install -q --upgrade pip \
        && "$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager '.[test]'; then
    "$venv/bin/python" -m pip list --format=freeze 2>/dev/null \
        | grep -i -E '^(click|rich|dnspython|dkimpy|pyspf|cryptography|pynacl|idna|pytest|aiosmtpd|dnslib|trustme)==' \
        | tr '\n' ' '
    echo
    # The launchers in bin/ (the daemon the tests start) run with the virtualenv's python too.
    ELEMTA_PYTHON="$venv/bin/python" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@" || pypi=$?
else
    pypi=$?
    echo "run-tests.sh: could not install elemta and its dependencies from PyPI into $venv" >&2
fi
pypi_took=$(took "$start" "$(seconds)")
echo "==== run 2 of 2 (PyPI's newest): exit $pypi after $pypi_took ===="

# The packages, when the whole suite was asked for and we are root (they build a .deb and an
# RPM, install the .deb into a fresh bookworm root and boot systemd there): about 2 minutes
# the first time, 1 minute with their cache.  ELEMTA_SKIP_PACKAGES=1 leaves them out.
packages=0
packages_took=skipped
if [ $# -eq 0 ] && [ "$(id -u)" -eq 0 ] && [ -z "${ELEMTA_SKIP_PACKAGES:-}" ]; then
    echo "==== the packages: packaging/test-deb.sh and packaging/test-rpm.sh ===="
    start=$(seconds)
    packaging/test-deb.sh || packages=$?
    packaging/test-rpm.sh || packages=$((packages + $?))
    packages_took=$(took "$start" "$(seconds)")
fi

echo "run-tests.sh: Debian's packages: exit $debian ($debian_took); PyPI's newest: exit $pypi ($pypi_took);" \
    "package tests: exit $packages ($packages_took)"
[ "$debian" -eq 0 ] && [ "$pypi" -eq 0 ] && [ "$packages" -eq 0 ]
