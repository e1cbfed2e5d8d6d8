#!/bin/bash
# packaging/test-rpm.sh: builds the noarch RPM with `rpmbuild -bb` from a `git archive` of the
# committed tree (as rpm/elemta.spec says), then checks the package without installing it:
# its files (`rpm -qlp`), their owners, modes and config flags, its scriptlets (`rpm -qp
# --scripts`: the user made in %pre, the unit handled), what it provides, and that its
# configuration passes `elemta --check-config`.
#
# Usage:  packaging/test-rpm.sh [--keep]      (as root it installs rpm and the Python build
# tools with apt if missing; otherwise they must be there, or it says so and exits 0)
# Ends with "test-rpm: N passed, M failed".

set -euo pipefail
export LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
NEEDS="git rpm cpio openssl python3 python3-build python3-installer python3-wheel python3-setuptools"

passed=0
failed=0
failures=""
log() { printf '%s\n' "test-rpm: $*" >&2; }
ok() { passed=$((passed + 1)); log "ok   $1"; }
fail() { failed=$((failed + 1)); failures="$failures
  $1"; log "FAIL $1${2:+: $2}"; }
check() {
    local name=$1
    shift
    if "$@" >/dev/null; then ok "$name"; else fail "$name"; fi
}

if [ "$(id -u)" -eq 0 ]; then
    "$HERE/ensure-debs.sh" $NEEDS
elif ! command -v rpmbuild >/dev/null || ! /usr/bin/python3 -c 'import build, installer' 2>/dev/null; then
    echo "test-rpm: skipped (needs rpmbuild and python3-build, python3-installer: run as root to install them)"
    exit 0
fi

KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
WORK=$(mktemp -d /tmp/elemta-test-rpm.XXXXXX)
cleanup() { if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
started=$(date +%s)

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/elemta/__init__.py")
spec_version=$(git -C "$REPO" show HEAD:rpm/elemta.spec | sed -n 's/^Version: *//p')
check "rpm/elemta.spec Version ($spec_version) is elemta's version ($version)" test "$spec_version" = "$version"

TOP=$WORK/rpmbuild
mkdir -p "$TOP/SOURCES" "$TOP/SPECS"
tarball=$TOP/SOURCES/elemta-$spec_version.tar.gz
git -C "$REPO" archive --format=tar.gz --prefix="elemta-$spec_version/" -o "$tarball" HEAD
tar -xzOf "$tarball" "elemta-$spec_version/rpm/elemta.spec" >"$TOP/SPECS/elemta.spec"

# --nodeps: the build requirements are Debian packages here, not in the rpm database.
if timeout 600 env -i PATH="$PATH" HOME="$WORK" LC_ALL=C.UTF-8 \
        rpmbuild --define "_topdir $TOP" -bb --nodeps "$TOP/SPECS/elemta.spec" >"$WORK/build.log" 2>&1; then
    RPM=$(ls "$TOP"/RPMS/noarch/elemta-*.noarch.rpm)
    ok "rpmbuild -bb built $(basename "$RPM")"
else
    tail -40 "$WORK/build.log" >&2
    fail "rpmbuild -bb"
    echo "test-rpm: $passed passed, $failed failed"
    exit 1
fi

files=$(rpm -qlp "$RPM")
has_files() {
    local f missing=0
    for f in "$@"; do
        printf '%s\n' "$files" | grep -qx "$f" || { log "  not in the package: $f"; missing=1; }
    done
    return $missing
}
check "the programs: elemta, elemtactl, elemta-sendmail in /usr/sbin" \
    has_files /usr/sbin/elemta /usr/sbin/elemtactl /usr/sbin/elemta-sendmail
check "sendmail, /usr/lib/sendmail, mailq, newaliases" \
    has_files /usr/sbin/sendmail /usr/lib/sendmail /usr/bin/mailq /usr/bin/newaliases
check "the unit /usr/lib/systemd/system/elemta.service" has_files /usr/lib/systemd/system/elemta.service
check "the configuration, spool and maildrop" \
    has_files /etc/elemta /etc/elemta/elemta.toml /var/spool/elemta /var/spool/elemta-maildrop
check "the Python package" sh -c "printf '%s\n' \"\$1\" | grep -q '/site-packages/elemta/daemon.py$'" - "$files"
check "man pages elemta(8), elemtactl(8), elemta.toml(5), sendmail(8), mailq(1), newaliases(8)" \
    sh -c 'for p in man8/elemta.8 man8/elemtactl.8 man5/elemta.toml.5 man8/sendmail.8 man1/mailq.1 man8/newaliases.8; do
               printf "%s\n" "$1" | grep -q "/man/$p" || exit 1; done' - "$files"

# name mode user group flags, one line per file
meta=$(rpm -qp --qf '[%{FILENAMES} %{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags}\n]' "$RPM")
meta_is() {  # meta_is PATH "mode user group flags"
    local got
    got=$(printf '%s\n' "$meta" | awk -v f="$1" '$1 == f { $1 = ""; sub(/^ /, ""); print }')
    [ "$got" = "$2" ] || { log "  $1: '$got', expected '$2'"; return 1; }
}
check "/etc/elemta/elemta.toml is %config(noreplace)" meta_is /etc/elemta/elemta.toml "-rw-r--r-- root root cn"
check "/etc/elemta root:elemta 0750" meta_is /etc/elemta "drwxr-x--- root elemta"
check "/var/spool/elemta elemta:elemta 0750" meta_is /var/spool/elemta "drwxr-x--- elemta elemta"
check "/var/spool/elemta-maildrop elemta:elemta 3733" meta_is /var/spool/elemta-maildrop "drwx-ws-wt elemta elemta"
check "the TLS key a %ghost config, root:elemta 0640" meta_is /etc/elemta/tls/elemta.key "-rw-r----- root elemta cmng"
check "/usr/sbin/sendmail -> elemta-sendmail" \
    sh -c 'rpm -qp --qf "[%{FILENAMES} %{FILELINKTOS}\n]" "$1" | grep -qx "/usr/sbin/sendmail elemta-sendmail"' - "$RPM"

scripts=$(rpm -qp --scripts "$RPM")
scripts_have() { printf '%s\n' "$scripts" | grep -q -- "$1" || { log "  scriptlets lack: $1"; return 1; }; }
check "%pre creates the group elemta" scripts_have "groupadd -r elemta"
check "%pre creates the system user elemta (no login)" scripts_have "useradd -r -g elemta .*nologin.* elemta"
check "%pre comes before the files: the user owns the spool" \
    sh -c 'printf "%s\n" "$1" | grep -q "^preinstall scriptlet"' - "$scripts"
check "%post enables the unit, %preun stops it, %postun restarts it after an upgrade" \
    sh -c 'printf "%s\n" "$1" | grep -q "preset elemta.service" && printf "%s\n" "$1" | grep -q "disable --now elemta.service" &&
           printf "%s\n" "$1" | grep -q "try-restart elemta.service"' - "$scripts"
check "Provides: MTA, smtpdaemon" sh -c 'p=$(rpm -qp --provides "$1"); echo "$p" | grep -qx MTA && echo "$p" | grep -qx smtpdaemon' - "$RPM"

# The packaged unit and configuration, as they are in the RPM.
mkdir -p "$WORK/root"
(cd "$WORK/root" && rpm2cpio "$RPM" | cpio -idm --quiet)
check "the unit is packaging/elemta.service" \
    cmp "$WORK/root/usr/lib/systemd/system/elemta.service" <(git -C "$REPO" show HEAD:packaging/elemta.service)
check "the configuration names the certificate %post makes" \
    grep -q '^key_file = "/etc/elemta/tls/elemta.key"' "$WORK/root/etc/elemta/elemta.toml"
src=$WORK/src
mkdir -p "$src"
tar -xzf "$tarball" -C "$src" --strip-components=1
# with a certificate made as %post makes it, where the test can put it. Root's check also
# asks that server.user exists, which this machine need not have: as root, the check runs
# as nobody, the key nobody's as it would be the service user's.
tls=$WORK/tls
mkdir -m 0700 "$tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -keyout "$tls/elemta.key" -out "$tls/elemta.pem" >/dev/null 2>&1
chmod 0600 "$tls/elemta.key"
sed "s|/etc/elemta/tls/|$tls/|" "$WORK/root/etc/elemta/elemta.toml" >"$WORK/elemta.toml"
as_user=()
if [ "$(id -u)" -eq 0 ]; then
    chmod 0755 "$WORK"
    chown -R nobody "$tls"
    as_user=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
fi
check "elemta --check-config accepts the RPM's configuration" \
    env -i PATH="$PATH" PYTHONPATH="$src" "${as_user[@]}" /usr/bin/python3 -m elemta --check-config --config "$WORK/elemta.toml"

log "took $(( $(date +%s) - started )) s"
[ "$failed" -eq 0 ] || log "failed:$failures"
echo "test-rpm: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
