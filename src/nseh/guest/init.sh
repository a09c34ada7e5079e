#!/bin/busybox sh
# nseh guest init: PID 1 of the guest initramfs (busybox ash).
#
# - configures eth0 from the kernel command line: nseh.name, nseh.ip4, nseh.gw4, nseh.ip6,
#   nseh.gw6 (addresses with prefix length, gateways without);
# - runs the test services on IPv4 and IPv6: TCP and UDP echo on port 7 (socat), HTTP on
#   port 80 (busybox httpd serving / and a 1 MiB /big);
# - serves the host's command channel on /dev/ttyS1 (the kernel console is ttyS0).
#
# Command channel protocol, one request per line (anything else on the line is ignored):
#   NSEH <nonce> <seconds> <base64 script, or - for an empty one> END
# answered with
#   NSEH-BEGIN <nonce> / <base64 of the script's stdout+stderr> / NSEH-END <nonce> <exit status>
# The script runs with stdin from /dev/null and at most <seconds> seconds; processes it
# starts in the background keep running (unless it runs out of time). No state is kept
# between requests, so the host may reconnect at will (also to the destination QEMU after a
# live migration).

/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

log() {
    echo "nseh-init: $*" >/dev/console
}

# Value of nseh.<name>= on the kernel command line, empty when absent.
cmdline_arg() {
    for word in $(cat /proc/cmdline); do
        case $word in "nseh.$1="*) echo "${word#*=}"; return ;; esac
    done
}

name=$(cmdline_arg name)
ip4=$(cmdline_arg ip4)
gw4=$(cmdline_arg gw4)
ip6=$(cmdline_arg ip6)
gw6=$(cmdline_arg gw6)
[ -n "$name" ] && hostname "$name"

# No duplicate address detection and no router advertisements: the addresses are assigned by
# the host and must work at once. Set on "default" before eth0 exists so the link-local
# address is covered too.
echo 0 >/proc/sys/net/ipv6/conf/default/accept_dad
echo 0 >/proc/sys/net/ipv6/conf/default/accept_ra

for module in $(cat /etc/nseh/modules); do
    insmod "/lib/nseh-modules/$module.ko" || log "insmod $module failed"
done

ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad
    ip link set eth0 up
    [ -n "$ip4" ] && ip addr add "$ip4" dev eth0
    [ -n "$gw4" ] && ip route add default via "$gw4" dev eth0
    [ -n "$ip6" ] && ip -6 addr add "$ip6" dev eth0
    [ -n "$gw6" ] && ip -6 route add default via "$gw6" dev eth0
else
    log "no eth0: network not configured"
fi

# Keep a service running: a service that dies is logged and restarted.
respawn() {
    while :; do
        "$@"
        log "$1 exited with status $?, restarting"
        sleep 1
    done &
}

mkdir -p /www
echo "nseh guest $name" >/www/index.html
dd if=/dev/zero of=/www/big bs=1024 count=1024 2>/dev/null

# IPv6 sockets with ipv6only=0 serve IPv4 clients too (as v4-mapped addresses).
respawn socat TCP6-LISTEN:7,ipv6only=0,reuseaddr,fork PIPE
respawn socat UDP6-RECVFROM:7,ipv6only=0,fork PIPE
respawn httpd -f -p 80 -h /www

serve_commands() {
    stty raw -echo 115200
    while read -r tag nonce seconds script end; do
        [ "$tag" = NSEH ] && [ "$end" = END ] || continue
        # The nonce names files, the limit is a number: reject anything else as line noise.
        case "$nonce" in "" | *[!0-9a-f]*) continue ;; esac
        case "$seconds" in "" | *[!0-9]*) continue ;; esac
        if [ "$script" = - ]; then  # empty script: answered without forking (readiness probes)
            printf '\nNSEH-BEGIN %s\nNSEH-END %s 0\n' "$nonce" "$nonce"
            continue
        fi
        out=/tmp/nseh-exec-$nonce
        echo "$script" | base64 -d >"$out.sh"
        # setsid: the script and everything it starts form a process group (its pid), so a
        # script that runs out of time is killed with what it left behind. Background
        # processes of scripts that finish in time keep running.
        timeout -s KILL "$seconds" setsid sh "$out.sh" </dev/null >"$out" 2>&1 &
        pid=$!
        wait "$pid"
        status=$?
        [ "$status" = 137 ] && kill -KILL -- "-$pid" 2>/dev/null
        printf '\nNSEH-BEGIN %s\n' "$nonce"
        base64 "$out"
        printf 'NSEH-END %s %s\n' "$nonce" "$status"
        rm -f "$out" "$out.sh"
    done
}

# Serve the command channel only once the services listen (TCP 7, TCP 80, UDP 7), so a
# host that sees the guest answer can use its services at once.
for _ in $(seq 100); do
    [ "$(netstat -ltnu 2>/dev/null | grep -c -E ':(7|80) ')" -ge 3 ] && break
    sleep 0.1
done
log "ready: name=$name ip4=$ip4 ip6=$ip6"
# In a subshell, not in PID 1: orphaned processes (background jobs of commands, timeout's
# watchdog) are reparented to PID 1, and a SIGCHLD arriving while ash's `read` builtin is
# mid-line makes it drop the bytes read so far, i.e. lose a request.
while :; do
    (serve_commands) </dev/ttyS1 >/dev/ttyS1 2>&1
    log "command channel loop ended, restarting"
    sleep 1
done
