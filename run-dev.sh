#!/bin/sh
# Install elemta's runtime packages from Debian (if missing) and run it in dev mode from this
# checkout: spool ./dev-spool, first free port of 2525-2528 on 127.0.0.1, mail held in the queue.
# click and rich are for bin/elemtactl --dev, which shows and changes that queue.
set -e
cd "$(dirname "$0")"
packaging/ensure-debs.sh python3 python3-idna python3-dnspython python3-click python3-rich python3-spf python3-dkim python3-nacl python3-cryptography python3-prometheus-client publicsuffix
exec bin/elemta --dev "$@"
