#!/bin/sh
# Install what the tests need from Debian (if missing) and run them with Debian's python3,
# so they run against bookworm's packages (Python 3.11, dnspython 2.3, click 8.1, ...).
set -e
cd "$(dirname "$0")"
packaging/ensure-debs.sh python3 python3-idna python3-dnspython python3-click python3-rich python3-spf python3-dkim python3-nacl python3-cryptography publicsuffix python3-pytest python3-aiosmtpd python3-dnslib python3-trustme swaks
exec /usr/bin/python3 -m pytest -q -p no:cacheprovider tests "$@"
