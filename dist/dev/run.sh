#!/usr/bin/env bash
# `make run`: the agent in user mode, the local reference cloud and, when a
# desktop session is there, the tray — all from this checkout, with their
# state under .run/. Ctrl-C stops everything.
set -euo pipefail
bin=${1:-bin}
cd "$(dirname "$0")/../.."
run=$PWD/.run
mkdir -p "$run"
listen=${CLOUDPROTECT_LISTEN:-127.0.0.1:8787}
socket=$run/cloudprotectd.sock
export CLOUDPROTECT_SOCKET=$socket

# One `make run` per checkout: a second one names the first and stops.
if [ -S "$socket" ] && [ -x "$bin/cloudprotect" ] && "$bin/cloudprotect" --socket "$socket" status >/dev/null 2>&1; then
	echo "cloudprotect: error: cloudprotect is already running from this checkout (agent on .run/cloudprotectd.sock$( [ -f "$run/pids" ] && printf ', processes %s' "$(tr '\n' ' ' <"$run/pids" | sed 's/ $//')" ))" >&2
	echo "cloudprotect: hint: use it (export CLOUDPROTECT_SOCKET=$socket), or stop it with Ctrl-C in its terminal first" >&2
	exit 1
fi
if (exec 3<>"/dev/tcp/${listen%:*}/${listen##*:}") 2>/dev/null; then
	echo "cloudprotect: error: something already listens on $listen, where the reference cloud should run" >&2
	echo "cloudprotect: hint: stop it, or choose another address: make run CLOUDPROTECT_LISTEN=127.0.0.1:8788" >&2
	exit 1
fi

pids=()
declare -A names=()
stop() {
	trap - INT TERM EXIT
	echo
	echo "stopping cloudprotect…"
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -f "$run/pids"
	exit 0
}
trap stop INT TERM EXIT

if [ -x "$bin/cloudprotect-server" ]; then
	"$bin/cloudprotect-server" serve --listen "$listen" --db "sqlite:$run/server.db" 2>>"$run/server.log" &
	pids+=($!)
	names[$!]="the reference cloud (log: .run/server.log)"
	echo "cloud:  reference Security Network on http://$listen (log: .run/server.log)"
fi

"$bin/cloudprotectd" --user --state-dir "$run/state" --socket "$socket" \
	--policy "$run/policy.json" --server "http://$listen" 2>>"$run/agent.log" &
pids+=($!)
names[$!]="the agent (log: .run/agent.log)"
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
if ! [ -S "$socket" ]; then
	echo "cloudprotect: error: the agent did not start; its log says:" >&2
	tail -5 "$run/agent.log" >&2
	exit 1
fi
echo "agent:  user mode, socket .run/cloudprotectd.sock (log: .run/agent.log)"

have_session=
if [ -n "${DBUS_SESSION_BUS_ADDRESS:-}" ] || [ -S "/run/user/$(id -u)/bus" ]; then have_session=1; fi
if [ -n "$have_session" ] && [ -x "$bin/cloudprotect-tray" ]; then
	"$bin/cloudprotect-tray" --socket "$socket" 2>>"$run/tray.log" &
	pids+=($!)
	names[$!]="the tray (log: .run/tray.log)"
	echo "tray:   icon in your panel (log: .run/tray.log)"
else
	echo "tray:   no desktop session here, so no tray icon. To see it, run \`make run\` in a"
	echo "        terminal of your desktop session, or there: CLOUDPROTECT_SOCKET=$socket $bin/cloudprotect-tray"
fi

cat <<TXT

cloudprotect is running. In another terminal:
  export CLOUDPROTECT_SOCKET=$socket
  $bin/cloudprotect status          # participation, agent, queue
  $bin/cloudprotect participate     # read the statement and agree
  $bin/cloudprotect queue           # exactly what would be sent
Press Ctrl-C to stop it all.
TXT
printf '%s\n' "${pids[@]}" >"$run/pids"
set +e
wait -n -p gone "${pids[@]}"
rc=$?
set -e
log=${names[$gone]#*log: }
log=${log%)}
echo "cloudprotect: error: ${names[$gone]% (*} stopped (exit status $rc); the others are stopped too. Its log ends:" >&2
tail -5 "${log/.run/$run}" >&2 || true
trap - INT TERM EXIT
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
rm -f "$run/pids"
exit 1
