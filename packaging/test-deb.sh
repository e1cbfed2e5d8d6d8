#!/bin/bash
# packaging/test-deb.sh: the Debian package, tested as a user gets it.
#
#   1. builds elemta_*.deb with dpkg-buildpackage from a clean `git clone` of this repository
#      (what is committed, nothing else) and runs lintian on it: any E: or W: fails;
#   2. installs it with `apt install ./elemta_*.deb` into a fresh bookworm root (debootstrap
#      --variant=minbase from the Debian mirror of this machine's apt sources, with systemd
#      and man-db), policy-rc.d forbidding service starts, and checks the user, the modes,
#      the conffile, the man pages, `systemd-analyze verify`, that nothing was started;
#   3. starts the daemon as the unit does (its User=, Group=, UMask=, the one capability,
#      its ExecStart=) in a private network namespace and checks the listeners answer;
#   4. submits a message as an ordinary user with /usr/sbin/sendmail -t and finds it in mailq;
#   5. stops the daemon by its PID;
#   6. boots systemd as PID 1 of a container made here (namespaces, a cgroup of its own,
#      pivot_root into the root) and checks elemta.service under its whole sandbox: started
#      at boot, READY=1, STATUS=, every process as elemta with seccomp and one capability,
#      sendmail into mailq, systemctl reload, the watchdog, systemd-analyze security, stop
#      (skipped, and said so, where no cgroup2 hierarchy can be written);
#   7. `apt remove` keeps the configuration and the spool, `apt purge` removes the
#      configuration and keeps a spool with mail waiting in it (removes an empty one).
#
# Usage, as root:  packaging/test-deb.sh [--keep]
#   --keep   leave the temporary directory (the build, the root) for a look afterwards
# Environment: ELEMTA_TEST_CACHE, where the base root tarball and the downloaded packages are
# kept between runs (default /var/cache/elemta-tests); ELEMTA_TEST_REFRESH=1 builds the base
# root again.
#
# Installs what it needs (debhelper, dh-python, lintian, debootstrap, ...) with apt. Not root:
# says so and exits 0. Every step is bounded in time; the install and the daemon run in a
# mount and PID namespace of their own, so every mount and every process is gone when it
# ends, whatever happened. Ends with "test-deb: N passed, M failed".

set -euo pipefail
export LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
SUITE=bookworm
# The base root: what the test root has before elemta (its dependencies come from apt).
BASE_PACKAGES="systemd,man-db"
BASE_FORMAT=1  # bump to make every cached base root stale
CACHE=${ELEMTA_TEST_CACHE:-/var/cache/elemta-tests}

passed=0
failed=0
failures=""

log() { printf '%s\n' "test-deb: $*" >&2; }
ok() { passed=$((passed + 1)); log "ok   $1"; }
fail() { failed=$((failed + 1)); failures="$failures
  $1"; log "FAIL $1${2:+: $2}"; }
# check NAME COMMAND...: one counted check.
check() {
    local name=$1
    shift
    if "$@" >/dev/null; then ok "$name"; else fail "$name"; fi
}

# "URI SUITE" for each Debian bookworm entry of this machine's apt sources (one-line and
# deb822 formats), so the test uses the mirror the machine is configured for.
debian_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                           print $i, $(i + 1) }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'function flush() { if (types ~ /(^| )deb( |$)/ && enabled != "no")
                                   for (u in uris) for (s in suites) print uris[u], suites[s]
                               types = ""; enabled = ""; delete uris; delete suites }
             BEGIN { IGNORECASE = 1 }
             /^[ \t]*$/ { flush(); next }
             /^#/ { next }
             /^Types:/ { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
             /^Enabled:/ { sub(/^[^:]*:[ \t]*/, ""); enabled = tolower($0) }
             /^URIs:/ { sub(/^[^:]*:[ \t]*/, ""); split($0, uris, /[ \t]+/) }
             /^Suites:/ { sub(/^[^:]*:[ \t]*/, ""); split($0, suites, /[ \t]+/) }
             END { flush() }' "$f"
    done | awk -v suite="$SUITE" '$2 ~ ("^" suite "(-updates|-security)?$")' | sort -u
}

# ---------------------------------------------------------------------------------------
# Step 1: build from a clean clone, lintian.

build_and_lint() {
    local src=$WORK/build/src
    mkdir -p "$WORK/build"
    git clone -q --no-hardlinks "$REPO" "$src"
    log "building the package from a clean clone ($(git -C "$src" log -1 --format=%h))"
    if ! (cd "$src" && timeout 900 env -i PATH="$PATH" HOME="$WORK" LC_ALL=C.UTF-8 \
            dpkg-buildpackage -us -uc -b) >"$WORK/build/build.log" 2>&1; then
        tail -40 "$WORK/build/build.log" >&2
        fail "dpkg-buildpackage -us -uc -b" "see above"
        return 1
    fi
    DEB=$(ls "$WORK"/build/elemta_*_all.deb)
    ok "dpkg-buildpackage -us -uc -b built $(basename "$DEB")"
    local changes lintian_out
    changes=$(ls "$WORK"/build/elemta_*.changes)
    # --fail-on error,warning: lintian's own exit status says whether any E: or W: was shown.
    if lintian_out=$(timeout 600 lintian --fail-on error,warning "$changes" 2>&1 |
            grep -v '^running with root privileges'; exit "${PIPESTATUS[0]}"); then
        ok "lintian: no error, no warning"
    else
        printf '%s\n' "$lintian_out" >&2
        fail "lintian" "errors or warnings above"
    fi
    [ -z "$lintian_out" ] || printf '%s\n' "$lintian_out" | sed 's/^/  lintian: /' >&2
}

# ---------------------------------------------------------------------------------------
# The base root: debootstrap once, kept as a tarball in $CACHE.

base_tarball() {
    local mirror key tarball tmp sources
    sources=$(debian_sources)
    mirror=$(printf '%s\n' "$sources" | awk -v s="$SUITE" '$2 == s { print $1; exit }')
    if [ -z "$mirror" ]; then
        log "no Debian $SUITE entry in /etc/apt/sources.list*: cannot make a root"
        return 1
    fi
    key=$(printf '%s\n' "$BASE_FORMAT" "$SUITE" "$BASE_PACKAGES" "$sources" | sha256sum | cut -c1-16)
    tarball=$CACHE/base-$SUITE-$key.tar
    if [ -s "$tarball" ] && [ "${ELEMTA_TEST_REFRESH:-0}" != 1 ]; then
        printf '%s\n' "$tarball"
        return 0
    fi
    log "making the base root with debootstrap (cached as $tarball)"
    mkdir -p "$CACHE/archives/partial"
    tmp=$WORK/base
    # debootstrap keeps the packages it fetched in the root's apt cache: start from ours.
    mkdir -p "$tmp/var/cache/apt/archives"
    cp -l "$CACHE"/archives/*.deb "$tmp/var/cache/apt/archives/" 2>/dev/null || true
    if ! timeout 1200 debootstrap --variant=minbase --include="$BASE_PACKAGES" \
            "$SUITE" "$tmp" "$mirror" >"$WORK/debootstrap.log" 2>&1; then
        tail -30 "$WORK/debootstrap.log" >&2
        return 1
    fi
    printf '%s\n' "$sources" | awk '{ print "deb", $1, $2, "main" }' >"$tmp/etc/apt/sources.list"
    # keep the packages for next time, then leave them out of the tarball
    cp -n "$tmp"/var/cache/apt/archives/*.deb "$CACHE/archives/" 2>/dev/null || true
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    rm -f "$CACHE"/base-"$SUITE"-*.tar
    tar -C "$tmp" --numeric-owner -cf "$tarball.new" .
    mv "$tarball.new" "$tarball"
    rm -rf "$tmp"
    printf '%s\n' "$tarball"
}

# ---------------------------------------------------------------------------------------
# Steps 2 to 5, inside `unshare --mount --pid --fork`: $ROOT is a fresh root.

in_root() {
    chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}
# in_root_timed SECONDS COMMAND...
in_root_timed() {
    local seconds=$1
    shift
    timeout "$seconds" chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

# A private network namespace with lo up, held by a sleeping process; commands enter it.
NET_HOLDER=""
start_netns() {
    unshare --net sleep 3600 &
    NET_HOLDER=$!
    local i
    for i in $(seq 100); do
        [ "$(readlink /proc/$NET_HOLDER/ns/net)" != "$(readlink /proc/self/ns/net)" ] && break
        sleep 0.05
    done
    nsenter -t "$NET_HOLDER" -n ip link set lo up
}
in_net() { nsenter -t "$NET_HOLDER" -n "$@"; }

DAEMON=""
stop_daemon() {
    [ -n "$DAEMON" ] || return 0
    kill -TERM "$DAEMON" 2>/dev/null || true
    local i
    for i in $(seq 600); do
        kill -0 "$DAEMON" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$DAEMON" 2>/dev/null; then
        kill -KILL "$DAEMON" 2>/dev/null || true
        wait "$DAEMON" 2>/dev/null || true
        DAEMON=""
        return 1
    fi
    wait "$DAEMON" 2>/dev/null || true
    DAEMON=""
}

cleanup_inside() {
    printf '%s %s\n%s\n' "$passed" "$failed" "$failures" >"$COUNTS"
    stop_daemon || true
    stop_container || true
    [ -z "$NET_HOLDER" ] || kill "$NET_HOLDER" 2>/dev/null || true
    local m
    for m in "$ROOT/var/cache/apt/archives" "$ROOT/run" "$ROOT/dev" "$ROOT/proc" /proc; do
        umount "$m" 2>/dev/null || true
    done
}

stat_is() {  # stat_is PATH "owner:group mode"
    local got
    got=$(chroot "$ROOT" stat -c '%U:%G %a' "$1" 2>/dev/null) || got="missing"
    [ "$got" = "$2" ] || { log "  $1 is $got, expected $2"; return 1; }
}

not() { ! "$@"; }
silent() {  # silent COMMAND...: succeeds, and prints nothing
    local out
    out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
    [ -z "$out" ] || { printf '%s\n' "$out" >&2; return 1; }
}
system_user() {
    local entry uid
    entry=$(chroot "$ROOT" getent passwd "$1") || return 1
    uid=$(echo "$entry" | cut -d: -f3)
    [ "$uid" -lt 1000 ] && echo "$entry" | grep -q ":/var/spool/$1:/usr/sbin/nologin$" ||
        { log "  $entry"; return 1; }
}
in_group() { chroot "$ROOT" id -nG "$1" | tr ' ' '\n' | grep -qx "$2"; }
is_conffile() { in_root dpkg-query -W -f='${Conffiles}\n' elemta | grep -q "^ $1 "; }
links_to() {
    local target=$1 f
    shift
    for f in "$@"; do
        [ "$(chroot "$ROOT" readlink -f "$f")" = "$target" ] || { log "  $f does not lead to $target"; return 1; }
    done
}
no_daemon_running() { ! grep -alsF /usr/sbin/elemta "$ROOT"/proc/[0-9]*/cmdline; }
pid_file_is() { [ "$(tr -d ' \n' <"$ROOT/var/spool/elemta/elemta.pid")" = "$1" ]; }
no_other_bits() { [ $(( 0$(stat -c %a "$ROOT$1") & 7 )) -eq 0 ]; }
dir_and_message() { [ -d "$ROOT$1" ] && printf '%s\n' "$3" | grep -qF "$2"; }
gone_and_message() {
    local message=$1 log_text=$2 path
    shift 2
    for path in "$@"; do [ ! -e "$ROOT$path" ] || { log "  $path is still there"; return 1; }; done
    printf '%s\n' "$log_text" | grep -qF "$message"
}

unit_value() { sed -n "s/^$1=//p" "$ROOT/lib/systemd/system/elemta.service" | head -1; }

# SMTP banner check in the private network: host port [tls]
banner() {
    in_net chroot "$ROOT" python3 - "$@" <<'PY'
import socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), timeout=10)
if sys.argv[3:] == ["tls"]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = ctx.wrap_socket(sock)
line = sock.makefile("rb").readline()
print(line.decode().strip())
sys.exit(0 if line.startswith(b"220 ") else 1)
PY
}

wait_for_banner() {
    local i
    for i in $(seq 150); do
        kill -0 "$DAEMON" 2>/dev/null || return 1
        banner 127.0.0.1 25 >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

proc_status_ok() {  # every process of the daemon runs as $1 (uid), the main one with CapEff $2
    local uid=$1 cap=$2 pid ok=0 pids
    pids=$(for d in "$ROOT"/proc/[0-9]*; do
        p=${d##*/}
        [ "$p" = "$DAEMON" ] && echo "$p" && continue
        awk -v d="$DAEMON" '$1 == "PPid:" && $2 == d { found = 1 } END { exit !found }' "$d/status" 2>/dev/null \
            && echo "$p"
    done)
    for pid in $pids; do
        if ! awk -v u="$uid" '$1 == "Uid:" { exit !($2 == u && $3 == u && $4 == u && $5 == u) }' \
                "$ROOT/proc/$pid/status"; then
            log "  process $pid does not run as uid $uid"
            ok=1
        fi
    done
    grep -q "^CapEff:[[:space:]]*$cap$" "$ROOT/proc/$DAEMON/status" || {
        log "  main process: $(grep CapEff "$ROOT/proc/$DAEMON/status")"
        ok=1
    }
    log "  daemon processes: $(echo $pids)"
    return $ok
}

# ---------------------------------------------------------------------------------------
# Step 6: systemd 252 as PID 1 of a container made here (mount, PID, UTS, IPC and network
# namespaces, a cgroup of its own in a cgroup namespace, pivot_root into $ROOT), so elemta.service
# runs as the unit says, with its whole sandbox: Type=notify, seccomp, the capability, the
# read-only file system, the watchdog, ExecReload=.

BOOT_UNSHARE="" BOOT_PID="" BOOT_CGROUP=""

# The container's init: runs as PID 1 of the new namespaces, execs systemd.
container_init() {
    local root=$1 d n major minor
    mount --bind "$root" "$root"  # a mount point of its own, without the test's mounts below
    mount -t proc proc "$root/proc"
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
    # In its cgroup namespace, a new cgroup2 mount shows the container's cgroup as the root.
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"
    mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
    for d in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
        IFS=: read -r n major minor <<<"$d"
        mknod -m 0666 "$root/dev/$n" c "$major" "$minor"
    done
    mkdir -p "$root/dev/pts" "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
    ln -s pts/ptmx "$root/dev/ptmx"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
    ip link set lo up
    hostname elemta-test
    cd "$root"
    mkdir -p .oldroot
    pivot_root . .oldroot
    cd /
    umount -l /.oldroot
    rmdir /.oldroot
    exec env -i container=elemta-test /lib/systemd/systemd --system --show-status=no </dev/null >/dev/null 2>&1
}

in_boot() {
    nsenter -t "$BOOT_PID" -m -u -i -n -p -r -w \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 SYSTEMD_PAGER= "$@"
}

stop_container() {
    [ -n "$BOOT_UNSHARE" ] || return 0
    local i
    if [ -n "$BOOT_PID" ]; then
        kill -s RTMIN+4 "$BOOT_PID" 2>/dev/null || true  # systemd: power off
        for i in $(seq 300); do kill -0 "$BOOT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$BOOT_PID" 2>/dev/null || true
    fi
    kill -KILL "$BOOT_UNSHARE" 2>/dev/null || true
    wait "$BOOT_UNSHARE" 2>/dev/null || true
    BOOT_UNSHARE="" BOOT_PID=""
    if [ -n "$BOOT_CGROUP" ] && [ -d "$BOOT_CGROUP" ]; then
        for i in $(seq 50); do
            find "$BOOT_CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [ -d "$BOOT_CGROUP" ] || break
            sleep 0.1
        done
    fi
}

unit_processes_ok() {  # every process of elemta.service: its user, seccomp, no new privileges, one capability
    local uid=$1
    in_boot sh -c '
        n=0
        for p in $(cat /sys/fs/cgroup/system.slice/elemta.service/cgroup.procs); do
            n=$((n + 1))
            s=$(cat /proc/$p/status)
            echo "$s" | grep -Eq "^Uid:[[:space:]]+'"$uid"'[[:space:]]+'"$uid"'[[:space:]]" &&
            echo "$s" | grep -q "^NoNewPrivs:[[:space:]]*1$" &&
            echo "$s" | grep -q "^Seccomp:[[:space:]]*2$" &&
            echo "$s" | grep -q "^CapEff:[[:space:]]*0000000000000400$" ||
                { echo "process $p:"; echo "$s" | grep -E "^(Uid|NoNewPrivs|Seccomp|CapEff):"; exit 1; } >&2
        done
        [ $n -ge 2 ]'
}

unit_property_set() { [ -n "$(in_boot systemctl show -p "$1" --value elemta.service)" ]; }
# same_main_process PID [RESTARTS]: still active with that main PID (and that many restarts)
same_main_process() {
    [ "$(in_boot systemctl is-active elemta.service)" = active ] &&
    [ "$(in_boot systemctl show -p MainPID --value elemta.service)" = "$1" ] &&
    { [ -z "${2:-}" ] || [ "$(in_boot systemctl show -p NRestarts --value elemta.service)" = "$2" ]; }
}
new_main_process() {  # new_main_process OLD: active again, with another main process
    wait_active && local now && now=$(in_boot systemctl show -p MainPID --value elemta.service) &&
    [ "$now" != "$1" ] && [ "$now" != 0 ]
}
unit_stopped() {
    [ "$(in_boot systemctl is-active elemta.service)" != active ] &&
    ! in_boot sh -c 'grep -alsE "/usr/sbin/elemt[a]" /proc/[0-9]*/cmdline'  # [a]: not this sh itself
}
stop_unit() {
    in_boot systemctl stop elemta.service &&
    [ "$(in_boot systemctl show -p Result --value elemta.service)" = success ] &&
    [ "$(in_boot systemctl is-active elemta.service)" = inactive ]
}

# A oneshot unit with elemta.service's own [Service] settings runs what elemta's plugins and
# privilege code load: cffi and Rust (cryptography, PyNaCl), ctypes (prctl), dkimpy, pyspf.
sandbox_probe() {
    sed -e 's/^Type=notify/Type=oneshot/' -e '/^NotifyAccess=\|^ExecReload=\|^Restart=\|^WatchdogSec=\|^ExecStart=/d' \
        -e 's|^\[Service\]|[Service]\nExecStart=/usr/bin/python3 /usr/local/lib/elemta-sandbox-probe.py|' \
        "$ROOT/lib/systemd/system/elemta.service" >"$ROOT/etc/systemd/system/elemta-sandbox-probe.service"
    mkdir -p "$ROOT/usr/local/lib"
    cat >"$ROOT/usr/local/lib/elemta-sandbox-probe.py" <<'PY'
import ctypes
import dkim, dns.resolver, nacl.signing, spf
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
ed25519.Ed25519PrivateKey.generate().sign(b"x")
rsa.generate_private_key(public_exponent=65537, key_size=2048).sign(b"x", padding.PKCS1v15(), hashes.SHA256())
nacl.signing.SigningKey.generate().sign(b"x")
assert ctypes.CDLL(None, use_errno=True).prctl(1, 15, 0, 0, 0) == 0  # PR_SET_PDEATHSIG
assert ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)(1) == 2
print("sandbox probe ok")
PY
    in_boot systemctl daemon-reload
    in_boot systemctl start elemta-sandbox-probe.service
    local result
    result=$(in_boot systemctl show -p Result --value elemta-sandbox-probe.service)
    [ "$result" = success ] || { in_boot journalctl -u elemta-sandbox-probe.service -n 20 >&2; return 1; }
}

wait_active() {  # wait_active: elemta.service active (Type=notify: after READY=1)
    local i state
    for i in $(seq 150); do
        state=$(in_boot systemctl is-active elemta.service 2>/dev/null) || true
        [ "$state" = active ] && return 0
        sleep 0.2
    done
    log "  elemta.service is $state"
    return 1
}

boot_checks() {
    local cgroup2 uid main out
    cgroup2=$(awk '{ for (i = 7; $i != "-"; i++); if ($(i + 1) == "cgroup2") { print $5; exit } }' /proc/self/mountinfo)
    BOOT_CGROUP=$cgroup2/$(basename "$(dirname "$ROOT")")
    if [ -z "$cgroup2" ] || ! mkdir "$BOOT_CGROUP" 2>/dev/null; then
        BOOT_CGROUP=""
        log "SKIP the unit under systemd: no cgroup2 hierarchy to make a container's cgroup in"
        return 0
    fi
    # Into the cgroup first: the cgroup namespace unshare makes is rooted where it starts.
    sh -c 'echo 0 >"$1/cgroup.procs" && shift && exec "$@"' - "$BOOT_CGROUP" \
        unshare --cgroup --mount --pid --fork --uts --ipc --net --propagation private \
        "$0" --container-init "$ROOT" &
    BOOT_UNSHARE=$!
    local i
    for i in $(seq 100); do
        # (a process may end while awk reads /proc: awk then exits 2)
        BOOT_PID=$( (awk -v p="$BOOT_UNSHARE" '$1 == "PPid:" && $2 == p { print FILENAME }' /proc/[0-9]*/status 2>/dev/null || true) |
            head -1 | cut -d/ -f3)
        [ -n "$BOOT_PID" ] && [ -e "/proc/$BOOT_PID/root/run/systemd/private" ] && break
        sleep 0.1
    done
    if [ -z "$BOOT_PID" ] || ! [ -e "/proc/$BOOT_PID/root/run/systemd/private" ]; then
        fail "systemd boots in a container" "no manager"
        stop_container
        return 0
    fi
    ok "systemd boots in a container"
    uid=$(chroot "$ROOT" id -u elemta)
    if wait_active; then
        ok "under systemd, elemta.service is started at boot (enabled by the package) and becomes active (READY=1)"
    else
        in_boot systemctl status elemta.service >&2 || true
        in_boot journalctl -u elemta.service -n 20 >&2 || true
        fail "under systemd, elemta.service becomes active"
        stop_container
        return 0
    fi
    check "its STATUS= shows in systemctl" unit_property_set StatusText
    check "every process of the unit: user elemta, seccomp, no new privileges, CAP_NET_BIND_SERVICE only" \
        unit_processes_ok "$uid"
    check "the unit answers 220 on port 25" \
        in_boot python3 -c 'import socket, sys; s = socket.create_connection(("127.0.0.1", 25), timeout=10); sys.exit(s.recv(4) != b"220 ")'
    check "/readyz answers 200 on 127.0.0.1:9525 (the monitor process, under the unit's sandbox)" \
        in_boot python3 -c '
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:9525/readyz", timeout=10)
except urllib.error.HTTPError as exc:
    sys.exit(f"/readyz: {exc.code} {exc.read().decode()}")'
    check "/metrics sums the processes' counters kept in RuntimeDirectory /run/elemta/metrics" \
        in_boot sh -c 'ls /run/elemta/metrics/counter_*.db && python3 -c "import urllib.request; t = urllib.request.urlopen(\"http://127.0.0.1:9525/metrics\", timeout=10).read(); assert b\"elemta_smtp_connections_total\" in t"'
    check "elemtactl status: running and ready (exit 0)" in_boot sh -c 'elemtactl status >&2'
    in_boot id alice >/dev/null 2>&1 || in_boot adduser --quiet --disabled-password --comment "" alice >/dev/null
    if printf 'To: carol@example.com\nSubject: test-deb under systemd\n\nhello\n' |
            in_boot setpriv --reuid=alice --regid=alice --init-groups /usr/sbin/sendmail -t; then
        local found=1
        for i in $(seq 60); do
            in_boot mailq 2>/dev/null | grep -q 'carol@example.com' && { found=0; break; }
            sleep 0.5
        done
        if [ $found -eq 0 ]; then
            ok "under systemd: sendmail -t by alice, then in mailq"
            mail_queued=1
        else
            fail "under systemd: sendmail -t by alice, then in mailq"
        fi
    else
        fail "under systemd: sendmail -t by alice"
    fi
    main=$(in_boot systemctl show -p MainPID --value elemta.service)
    check "systemctl reload elemta (checks the file, then SIGHUP)" in_boot systemctl reload elemta.service
    check "... the same main process still runs" same_main_process "$main"
    check "the unit's sandbox (seccomp, MemoryDenyWriteExecute, ...) runs cryptography, PyNaCl, dkimpy, pyspf, dnspython and ctypes" \
        sandbox_probe
    # The watchdog: with WatchdogSec=2s a daemon that does not ping is killed within 2 s.
    mkdir -p "$ROOT/etc/systemd/system/elemta.service.d"
    printf '[Service]\nWatchdogSec=2s\n' >"$ROOT/etc/systemd/system/elemta.service.d/test-watchdog.conf"
    in_boot systemctl daemon-reload
    in_boot systemctl restart elemta.service || true
    main=$(in_boot systemctl show -p MainPID --value elemta.service)
    sleep 7
    check "WATCHDOG=1 pings: with WatchdogSec=2s the daemon still runs 7 s later, never restarted" \
        same_main_process "$main" 0
    rm -r "$ROOT/etc/systemd/system/elemta.service.d"
    in_boot systemctl daemon-reload
    out=$(in_boot systemd-analyze security elemta.service 2>&1 | tail -1)
    log "  $out"
    check "systemd-analyze security: OK or better" grep -Eq " (OK|SAFE|PERFECT) " <<<"$out"
    # The maintainer scripts where systemd runs (the root's policy-rc.d set aside).
    local deb_name=${DEB##*/}
    cp "$DEB" "$ROOT/var/tmp/$deb_name"
    mv "$ROOT/usr/sbin/policy-rc.d" "$ROOT/var/tmp/policy-rc.d"
    main=$(in_boot systemctl show -p MainPID --value elemta.service)
    if in_boot apt-get install -y -q --reinstall "/var/tmp/$deb_name" >"$ROOT/var/tmp/apt.log" 2>&1; then
        check "an upgrade (apt install --reinstall) restarts the service" new_main_process "$main"
    else
        cat "$ROOT/var/tmp/apt.log" >&2
        fail "apt install --reinstall under systemd"
    fi
    if in_boot apt-get remove -y -q elemta >"$ROOT/var/tmp/apt.log" 2>&1; then
        check "apt remove stops the service" unit_stopped
    else
        cat "$ROOT/var/tmp/apt.log" >&2
        fail "apt remove under systemd"
    fi
    if in_boot apt-get install -y -q "/var/tmp/$deb_name" >"$ROOT/var/tmp/apt.log" 2>&1; then
        check "apt install where systemd runs starts the service" wait_active
    else
        cat "$ROOT/var/tmp/apt.log" >&2
        fail "apt install under systemd"
    fi
    mv "$ROOT/var/tmp/policy-rc.d" "$ROOT/usr/sbin/policy-rc.d"
    rm -f "$ROOT/var/tmp/$deb_name" "$ROOT/var/tmp/apt.log"
    check "systemctl stop elemta: stopped cleanly" stop_unit
    in_boot journalctl -u elemta.service --no-pager -n 6 2>&1 | sed 's/^/  journal: /' >&2 || true
    stop_container
}

inside() {
    ROOT=$1 DEB=$2
    trap cleanup_inside EXIT
    # This mount namespace's own /proc shows this PID namespace (nsenter -t, kill, $ROOT/proc).
    mount -t proc proc /proc
    mount -t proc proc "$ROOT/proc"
    mount --bind /dev "$ROOT/dev"
    mount -t tmpfs -o mode=0755 tmpfs "$ROOT/run"
    mount --bind "$CACHE/archives" "$ROOT/var/cache/apt/archives"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    printf '#!/bin/sh\n# test-deb: no service starts in this root\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
    cp "$DEB" "$ROOT/tmp/"
    local deb_in_root=/tmp/${DEB##*/}

    # --- step 2: install and look
    log "installing $(basename "$DEB") with apt in a fresh $SUITE root"
    if ! in_root_timed 300 apt-get update -qq >"$ROOT/tmp/apt.log" 2>&1 ||
       ! in_root_timed 900 apt-get install -y -q --no-install-recommends "$deb_in_root" >>"$ROOT/tmp/apt.log" 2>&1; then
        tail -40 "$ROOT/tmp/apt.log" >&2
        fail "apt install ./$(basename "$DEB")"
        return 0
    fi
    ok "apt install ./$(basename "$DEB")"

    check "user elemta: a system user with no login, home /var/spool/elemta" system_user elemta
    check "group elemta exists" chroot "$ROOT" getent group elemta
    check "elemta is in group ssl-cert" in_group elemta ssl-cert
    check "/etc/elemta root:elemta 0750" stat_is /etc/elemta "root:elemta 750"
    check "/etc/elemta/elemta.toml root:root 0644" stat_is /etc/elemta/elemta.toml "root:root 644"
    check "/etc/elemta/elemta.toml is a conffile" is_conffile /etc/elemta/elemta.toml
    check "/var/spool/elemta elemta:elemta 0750" stat_is /var/spool/elemta "elemta:elemta 750"
    check "/var/spool/elemta-maildrop elemta:elemta 3733" stat_is /var/spool/elemta-maildrop "elemta:elemta 3733"
    check "/etc/mailname made (Debian Policy 11.6)" test -s "$ROOT/etc/mailname"
    check "sendmail, mailq, newaliases lead to elemta-sendmail" links_to /usr/sbin/elemta-sendmail \
        /usr/sbin/sendmail /usr/lib/sendmail /usr/bin/mailq /usr/bin/newaliases
    check "man -w elemta elemtactl elemta.toml sendmail mailq newaliases" \
        in_root man -w elemta elemtactl elemta.toml sendmail mailq newaliases
    check "systemd-analyze verify elemta.service: no complaint" silent in_root systemd-analyze verify /lib/systemd/system/elemta.service
    check "elemta.service enabled" test -L "$ROOT/etc/systemd/system/multi-user.target.wants/elemta.service"
    check "no daemon was started in the root (policy-rc.d)" no_daemon_running
    check "elemta --check-config accepts the installed configuration" \
        in_root setpriv --reuid=elemta --regid=elemta --init-groups \
            /usr/sbin/elemta --config /etc/elemta/elemta.toml --check-config

    # --- step 3: the daemon as the unit starts it
    local user group umask_ exec_start uid mail_queued=0
    user=$(unit_value User) group=$(unit_value Group) umask_=$(unit_value UMask)
    exec_start=$(unit_value ExecStart)
    uid=$(chroot "$ROOT" id -u "$user")
    start_netns
    # RuntimeDirectory=elemta, as systemd makes it: the metrics counters' directory.
    install -d -o "$uid" -g "$(chroot "$ROOT" id -g "$user")" -m 0750 "$ROOT/run/elemta"
    log "starting, as $user:$group with CAP_NET_BIND_SERVICE: $exec_start"
    # shellcheck disable=SC2086  # ExecStart= is a command line
    (umask "$umask_" && exec nsenter -t "$NET_HOLDER" -n chroot "$ROOT" \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 RUNTIME_DIRECTORY=/run/elemta \
        setpriv --reuid="$user" --regid="$group" --init-groups --no-new-privs \
            --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
            --bounding-set=-all,+net_bind_service \
            $exec_start) >"$ROOT/tmp/daemon.log" 2>&1 &
    DAEMON=$!
    if wait_for_banner; then
        ok "the daemon answers 220 on 127.0.0.1:25"
        check "... and on [::1]:25" banner ::1 25
        check "... on 587" banner 127.0.0.1 587
        check "... on 465 with TLS (the snakeoil key, read through group ssl-cert)" banner 127.0.0.1 465 tls
        check "every daemon process runs as $user, the main one with CAP_NET_BIND_SERVICE only" \
            proc_status_ok "$uid" 0000000000000400
        check "PID file /var/spool/elemta/elemta.pid holds the daemon's PID" pid_file_is "$DAEMON"
        check "queue.db: nothing for others" no_other_bits /var/spool/elemta/queue.db

        # --- step 4: local submission by an ordinary user
        in_root adduser --quiet --disabled-password --comment "" alice >/dev/null
        local out rc=0
        out=$(printf 'From: alice\nTo: bob@example.com\nSubject: test-deb\n\nhello from test-deb\n' |
                timeout 60 nsenter -t "$NET_HOLDER" -n chroot "$ROOT" \
                env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/home/alice USER=alice LOGNAME=alice \
                setpriv --reuid=alice --regid=alice --init-groups /usr/sbin/sendmail -t 2>&1) || rc=$?
        if [ "$rc" -eq 0 ]; then
            ok "sendmail -t as user alice exits 0"
            local i found=1
            for i in $(seq 60); do
                if in_net chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
                        mailq 2>&1 | grep -q 'bob@example.com'; then
                    found=0
                    break
                fi
                sleep 0.5
            done
            if [ $found -eq 0 ]; then
                ok "the message is in mailq (run as root)"
                mail_queued=1
            else
                in_net chroot "$ROOT" mailq >&2 || true
                fail "the message is in mailq (run as root)"
            fi
        else
            printf '%s\n' "$out" >&2
            fail "sendmail -t as user alice exits 0" "exit status $rc"
        fi
    else
        tail -20 "$ROOT/tmp/daemon.log" >&2
        fail "the daemon answers 220 on 127.0.0.1:25"
    fi
    # --- step 5: stop, remove, purge
    if [ -n "$DAEMON" ]; then
        local pid=$DAEMON
        if stop_daemon; then ok "the daemon stops on SIGTERM to PID $pid"; else fail "the daemon stops on SIGTERM"; fi
    fi
    kill "$NET_HOLDER" 2>/dev/null || true
    NET_HOLDER=""
    sed 's/^/  daemon: /' "$ROOT/tmp/daemon.log" | tail -15 >&2

    # --- step 6: the real unit, under systemd booted in a container of its own
    boot_checks


    if in_root_timed 300 apt-get remove -y -q elemta >"$ROOT/tmp/remove.log" 2>&1; then
        ok "apt remove elemta"
        check "after remove: /usr/sbin/elemta is gone" test ! -e "$ROOT/usr/sbin/elemta"
        check "after remove: the configuration is kept" test -f "$ROOT/etc/elemta/elemta.toml"
        check "after remove: the spool is kept" test -d "$ROOT/var/spool/elemta"
    else
        cat "$ROOT/tmp/remove.log" >&2
        fail "apt remove elemta"
    fi
    local purge_log
    if purge_log=$(in_root_timed 300 apt-get purge -y -q elemta 2>&1); then
        ok "apt purge elemta"
        check "after purge: /etc/elemta is gone" test ! -e "$ROOT/etc/elemta"
        check "after purge: no statoverride left" not in_root dpkg-statoverride --list /etc/elemta
        check "after purge: the user elemta stays" chroot "$ROOT" getent passwd elemta
        if [ "$mail_queued" = 1 ]; then
            check "after purge: the spool with mail waiting is kept, and purge says so" \
                dir_and_message /var/spool/elemta "kept /var/spool/elemta" "$purge_log"
            rm -rf "$ROOT/var/spool/elemta" "$ROOT/var/spool/elemta-maildrop"
        fi
        # Once more with no mail: install, purge, and the spool goes.
        if in_root_timed 600 apt-get install -y -q --no-install-recommends "$deb_in_root" >>"$ROOT/tmp/apt.log" 2>&1 &&
           purge_log=$(in_root_timed 300 apt-get purge -y -q elemta 2>&1); then
            check "purge with no mail waiting removes the spool and the maildrop, and says so" \
                gone_and_message "removed /var/spool/elemta" "$purge_log" /var/spool/elemta /var/spool/elemta-maildrop
        else
            fail "install and purge again"
        fi
    else
        printf '%s\n' "$purge_log" >&2
        fail "apt purge elemta"
    fi
    return 0
}

# ---------------------------------------------------------------------------------------

if [ "${1:-}" = "--container-init" ]; then
    container_init "$2"
fi
if [ "${1:-}" = "--inside" ]; then
    # Re-executed in new mount and PID namespaces: $2 the root, $3 the .deb, $4 the counts file.
    COUNTS=$4 CACHE=$5
    inside "$2" "$3"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "test-deb: skipped (needs root: debootstrap, chroot, namespaces)"
    exit 0
fi
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

started=$(date +%s)
"$HERE/ensure-debs.sh" git build-essential debhelper dh-python pybuild-plugin-pyproject python3-all \
    python3-setuptools lintian debootstrap util-linux iproute2
WORK=$(mktemp -d /tmp/elemta-test-deb.XXXXXX)
cleanup() {
    [ -z "$LIMIT" ] || kill "$LIMIT" 2>/dev/null || true
    if [ -n "$INSIDE" ]; then
        kill -KILL "$INSIDE" 2>/dev/null || true  # unshare ignores TERM; its child dies with it (--kill-child)
        wait "$INSIDE" 2>/dev/null || true
    fi
    # The container's cgroup, left behind if the inside part was killed (its processes
    # died with its PID namespace, so the cgroup is empty).
    local cgroup2
    cgroup2=$(awk '{ for (i = 7; $i != "-"; i++); if ($(i + 1) == "cgroup2") { print $5; exit } }' /proc/self/mountinfo)
    local i
    for i in $(seq 50); do  # killed processes take a moment to leave it
        [ -n "$cgroup2" ] && [ -d "$cgroup2/${WORK##*/}" ] || break
        find "$cgroup2/${WORK##*/}" -depth -type d -exec rmdir {} + 2>/dev/null || sleep 0.1
    done
    # Mounts exist only in the namespace of the inside part, gone with it; be sure anyway.
    if grep -q " $WORK/" /proc/self/mountinfo; then
        log "something is still mounted under $WORK: left as it is"
    elif [ "$KEEP" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
INSIDE="" LIMIT=""
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$CACHE/archives/partial"

DEB=""
if build_and_lint; then
    log "build and lintian: $(( $(date +%s) - started )) s"
    if tarball=$(base_tarball); then
        ROOT=$WORK/root
        mkdir -p "$ROOT"
        tar -C "$ROOT" --numeric-owner -xf "$tarball"
        log "fresh root ready: $(( $(date +%s) - started )) s"
        # --kill-child: when unshare ends (the time limit, or this script interrupted), the
        # inside part, PID 1 of its namespace, is killed and every process in it with it.
        unshare --mount --pid --fork --kill-child --propagation private \
            "$0" --inside "$ROOT" "$DEB" "$WORK/counts" "$CACHE" &
        INSIDE=$!
        sleep 2400 &
        LIMIT=$!
        rc=0
        ended=""
        wait -n -p ended "$INSIDE" "$LIMIT" || rc=$?
        if [ "$ended" != "$INSIDE" ]; then
            log "the install steps took more than 2400 s: stopped"
            kill -KILL "$INSIDE" 2>/dev/null || true  # unshare ignores TERM; its child dies with it (--kill-child)
            rc=0
            wait "$INSIDE" || rc=$?
        fi
        kill "$LIMIT" 2>/dev/null || true
        wait "$LIMIT" 2>/dev/null || true
        LIMIT="" INSIDE=""
        [ "$rc" -eq 0 ] || fail "the install steps" "exit status $rc"
        if [ -s "$WORK/counts" ]; then
            read -r p f <"$WORK/counts"
            passed=$((passed + p)) failed=$((failed + f))
            failures="$failures$(tail -n +2 "$WORK/counts")"
        fi
    else
        fail "a $SUITE root from debootstrap"
    fi
fi
log "took $(( $(date +%s) - started )) s"
[ "$failed" -eq 0 ] || log "failed:$failures"
echo "test-deb: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
