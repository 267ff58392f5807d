#!/usr/bin/env bash
# A shaped link to a network namespace, for registry scenarios that are not loopback: the
# registry runs inside a network namespace at 10.231.INDEX.2; the host reaches it over a
# point-to-point pair of TUN devices (kbhINDEX on the host, kbnINDEX inside) joined by
# delayline.py (half the round-trip time each way), and an htb qdisc on each device's egress
# limits the rate in each direction, with a byte FIFO of about twice the bandwidth-delay
# product as the bottleneck's buffer. The namespace belongs to the delay line's process
# (no /run/netns entry): it goes away when the link goes down.
#
#   bench/shaped/link.sh up NAME INDEX RATE RTT_MS    e.g. up 1gbit-10ms 1 1gbit 10 → prints 10.231.1.2
#   bench/shaped/link.sh exec NAME CMD...             runs CMD inside the link's namespace
#   bench/shaped/link.sh check NAME INDEX             connect time (one RTT) and a 50 MB GET over it
#   bench/shaped/link.sh down NAME
#
# Why not veth + netem: netem (CONFIG_NET_SCH_NETEM) is not in every kernel (not in this
# machine's); TUN, htb and network namespaces are. The MTU is 65,000 so that the userspace
# delay line moves few packets even at 1 Gbit/s (it forwards over 3 Gbit/s here).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CMD=${1:?usage: link.sh up|exec|check|down NAME ...}
NAME=${2:?name}
PIDFILE=/run/kbench-link-$NAME.pid
LOGFILE=/run/kbench-link-$NAME.log

in_ns() { nsenter --net="/proc/$(cat "$PIDFILE")/ns/net" "$@"; }

rate_bits() { # 1gbit, 200mbit, 500kbit → bits/s
  python3 -c 'import re,sys; m=re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit",sys.argv[1].lower()) or sys.exit("rate must look like 200mbit or 1gbit, not "+sys.argv[1]); print(int(float(m[1])*{"":1,"k":1e3,"m":1e6,"g":1e9}[m[2]]))' "$1"
}

shape() { # DEV RATE LIMIT_BYTES [in_ns]
  local dev=$1 rate=$2 limit=$3; shift 3
  "$@" tc qdisc add dev "$dev" root handle 1: htb default 1
  "$@" tc class add dev "$dev" parent 1: classid 1:1 htb rate "$rate" ceil "$rate" burst 256k cburst 256k quantum 65536
  "$@" tc qdisc add dev "$dev" parent 1:1 handle 10: bfifo limit "$limit"
}

case "$CMD" in
  up)
    I=${3:?index}; RATE=${4:?rate, e.g. 200mbit}; RTT=${5:?rtt in ms}
    HOST_IF=kbh$I; NS_IF=kbn$I; HOST_IP=10.231.$I.1; NS_IP=10.231.$I.2
    bits=$(rate_bits "$RATE")
    limit=$(( bits / 8 * RTT / 1000 * 2 )); (( limit < 262144 )) && limit=262144
    "$0" down "$NAME" 2>/dev/null || true
    rm -f "$LOGFILE"
    python3 "$HERE/delayline.py" "$HOST_IF" "$NS_IF" "$(python3 -c "print($RTT/2)")" >"$LOGFILE" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 100); do grep -q ready "$LOGFILE" 2>/dev/null && break; sleep 0.05; done
    grep -q ready "$LOGFILE" || { cat "$LOGFILE" >&2; exit 1; }
    ip addr add "$HOST_IP" peer "$NS_IP" dev "$HOST_IF"
    ip link set "$HOST_IF" mtu 65000 up
    in_ns ip link set lo up
    in_ns ip addr add "$NS_IP" peer "$HOST_IP" dev "$NS_IF"
    in_ns ip link set "$NS_IF" mtu 65000 up
    shape "$HOST_IF" "$RATE" "$limit"
    shape "$NS_IF" "$RATE" "$limit" in_ns
    echo "$NS_IP"
    ;;
  exec)
    shift 2
    exec nsenter --net="/proc/$(cat "$PIDFILE")/ns/net" "$@"
    ;;
  down)
    if [ -f "$PIDFILE" ]; then kill "$(cat "$PIDFILE")" 2>/dev/null || true; rm -f "$PIDFILE"; fi
    rm -f "$LOGFILE"
    ;;
  check)
    I=${3:?index}; NS_IP=10.231.$I.2
    dir=$(mktemp -d); head -c 50000000 /dev/zero >"$dir/blob"
    in_ns python3 -m http.server --bind "$NS_IP" 18080 --directory "$dir" >/dev/null 2>&1 &
    srv=$!
    for _ in $(seq 50); do curl -fsI "http://$NS_IP:18080/blob" >/dev/null 2>&1 && break; sleep 0.1; done
    curl -s -o /dev/null -w 'TCP connect (one RTT): %{time_connect} s\n' "http://$NS_IP:18080/blob"
    curl -s -o /dev/null -w 'GET 50 MB: %{time_total} s, %{speed_download} B/s\n' "http://$NS_IP:18080/blob"
    kill $srv; wait $srv 2>/dev/null || true; rm -rf "$dir"
    ;;
  *) echo "link.sh: up, exec, check or down, not $CMD" >&2; exit 2 ;;
esac
