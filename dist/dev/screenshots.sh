#!/usr/bin/env bash
# The tray in a real panel, for docs/img: Xvfb with xfce4-panel (its
# systray plugin shows StatusNotifierItems) and dunst as the notification
# daemon, brought up by real-desktop.sh. For each language (English and
# German by default) it drives the real agent, the reference cloud, the
# command line and the tray through every state, and writes
#
#   docs/img/tray-states-LANG.png      each state's icon in the panel at real size, on a dark and a light panel
#   docs/img/tray-menu-STATE-LANG.png  the menu, opened with a click on the icon
#   docs/img/tray-alert-LANG.png       a blocked program: the notification that stays, and the menu
#
# Usage: make build && dist/dev/screenshots.sh [OUT_DIR] (as root: the agent
# blocks at exec, which needs fanotify permission events).
# Needs the Debian packages xvfb openbox xfce4-panel xfconf dunst imagemagick
# xdotool dbus-x11 fonts-dejavu-core, and real-desktop.sh (REAL_DESKTOP,
# default: shared/tools/real-desktop beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
out=$(realpath -m "${1:-docs/img}")
bin=$(realpath "${BIN:-bin}")
langs=${LANGS:-"en de"}
rd=${REAL_DESKTOP:-}
if [ -z "$rd" ]; then
	for d in .. ../.. ../../..; do
		if [ -x "$d/shared/tools/real-desktop/real-desktop.sh" ]; then rd=$(realpath "$d/shared/tools/real-desktop/real-desktop.sh"); break; fi
	done
fi
[ -x "${rd:-}" ] || { echo "screenshots: error: real-desktop.sh not found; set REAL_DESKTOP" >&2; exit 1; }
for p in cloudprotectd cloudprotect cloudprotect-tray cloudprotect-server; do
	[ -x "$bin/$p" ] || { echo "screenshots: error: $bin/$p missing; run make build" >&2; exit 1; }
done
for t in Xvfb xfce4-panel xfconf-query dunst convert import xdotool; do
	command -v "$t" >/dev/null || { echo "screenshots: error: $t missing (see the packages at the top of $0)" >&2; exit 1; }
done
mkdir -p "$out"

# Where the panel shows the icon (1280×800 screen, panel on top) and what
# to cut out: the right end of the panel, at real size.
icon_x=${ICON_X:-1155}
icon_y=16
panel_crop=300x32+980+0

base=$(mktemp -d)
work=$base
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	"$rd" stop "$work/desk" 2>/dev/null || true
	if [ "$BASHPID" = "$$" ]; then
		if [ -n "${KEEP:-}" ]; then echo "screenshots: kept $base" >&2; else rm -rf "$base"; fi
	fi
}
trap cleanup EXIT

shot() { # shot NAME: the whole screen to $work/NAME.png, the mouse out of the way
	xdotool mousemove 640 500
	sleep 0.4
	"$rd" shot "$work/desk" "$1" >/dev/null
	mv "$work/desk/$1.png" "$work/$1.png"
}
panel() { # panel dark|light: the panel's background colour
	local v=0.16
	[ "$1" = light ] && v=0.95
	xfconf-query -c xfce4-panel -p /panels/panel-1/background-style -n -t uint -s 1
	xfconf-query -c xfce4-panel -p /panels/panel-1/background-rgba -n -t double -t double -t double -t double -s $v -s $v -s $v -s 1
	sleep 0.8
}
states_row() { # states_row STATE LABEL: the icon on a dark and a light panel
	shot "$1-dark"
	panel light
	shot "$1-light"
	panel dark
	convert "$work/$1-dark.png" -crop "$panel_crop" +repage "$work/$1-dark-crop.png"
	convert "$work/$1-light.png" -crop "$panel_crop" +repage "$work/$1-light-crop.png"
	convert -size 260x32 xc:white -font DejaVu-Sans -pointsize 13 -fill '#222' -gravity west -annotate +10+0 "$2" \
		"$work/$1-dark-crop.png" "$work/$1-light-crop.png" +append "$work/row-$(printf %02d "$row")-$1.png"
	row=$((row + 1))
}
menu() { # menu STATE: the opened menu, from the panel to the menu's bottom
	xdotool key Escape
	xdotool mousemove "$icon_x" "$icon_y" click 1
	sleep 0.5
	xdotool mousemove 300 700 # away from the icon: no tooltip over the menu
	sleep 1
	"$rd" shot "$work/desk" "menu-$1" >/dev/null
	xdotool key Escape
	convert "$work/desk/menu-$1.png" -crop 800x340+480+0 +repage "$out/tray-menu-$1-$lang.png"
}
wait_state() { # wait_state REGEXP: until the agent's status as JSON matches
	for _ in $(seq 100); do
		"$bin/cloudprotect" status --json 2>/dev/null | tr -d ' \n' | grep -Eq "$1" && return 0
		sleep 0.1
	done
	echo "screenshots: warning: status never matched $1" >&2
}
start_agent() {
	"$bin/cloudprotectd" --state-dir "$work/agent" --socket "$CLOUDPROTECT_SOCKET" --policy "$work/policy.json" \
		--server "http://127.0.0.1:787" "$@" >>"$work/agent.log" 2>&1 &
	agent=$!
	pids+=($agent)
	for _ in $(seq 100); do [ -S "$CLOUDPROTECT_SOCKET" ] && break; sleep 0.1; done
}
wait_tray() { # wait_tray: until the tray has reached the agent since the last call
	for _ in $(seq 150); do
		[ "$(grep -c 'agent reached' "$work/tray.log")" -gt "$reached" ] && break
		sleep 0.1
	done
	reached=$(grep -c 'agent reached' "$work/tray.log")
	sleep 1
}
stop_agent() { kill "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; }

for lang in $langs; do
	# Each language in a subshell: the desktop's variables do not reach
	# the next one's start.
	(
	trap cleanup EXIT
	case $lang in
	en) locale=en_US.UTF-8 ;;
	de) locale=de_DE.UTF-8 ;;
	ru) locale=ru_RU.UTF-8 ;;
	*) echo "screenshots: error: unknown language $lang" >&2; exit 1 ;;
	esac
	label() { # label KEY: the state's name in the language of the shots
		case $lang:$1 in
		de:participating) echo "An, nimmt teil" ;;
		de:limited) echo "An, eingeschränkt" ;;
		de:undecided) echo "Wartet auf Ihre Antwort" ;;
		de:declined) echo "Aus, nimmt nicht teil" ;;
		de:unreachable) echo "Agent läuft nicht" ;;
		de:threat) echo "Neuer Fund" ;;
		ru:participating) echo "Включена, участвует" ;;
		ru:limited) echo "Включена, с ограничениями" ;;
		ru:undecided) echo "Ждёт вашего ответа" ;;
		ru:declined) echo "Выключена, не участвует" ;;
		ru:unreachable) echo "Агент не запущен" ;;
		ru:threat) echo "Новое обнаружение" ;;
		*:participating) echo "On, participating" ;;
		*:limited) echo "On, limited" ;;
		*:undecided) echo "Waiting for your answer" ;;
		*:declined) echo "Off, not participating" ;;
		*:unreachable) echo "Agent not running" ;;
		*:threat) echo "New detection" ;;
		esac
	}
	work=$base/$lang # a fresh desktop for each language
	mkdir -p "$work/desk"
	eval "$("$rd" start "$work/desk")"
	panel dark
	export LANG=$locale LANGUAGE= LC_ALL= LC_MESSAGES=
	export CLOUDPROTECT_SOCKET=$work/run/agent.sock
	mkdir -p "$work/run" "$HOME/Downloads"
	row=0
	reached=0

	# A program the Security Network knows to be malicious; it is
	# downloaded only when its turn comes.
	prog=$HOME/Downloads/invoice-viewer
	cp /usr/bin/true "$work/invoice-viewer" && printf 'screenshot %s' "$RANDOM" >>"$work/invoice-viewer"
	chmod +x "$work/invoice-viewer"
	sha256sum "$work/invoice-viewer" | cut -d' ' -f1 >"$work/malicious.txt"
	"$bin/cloudprotect-server" import --db "sqlite:$work/server.db" --malicious "$work/malicious.txt" --feed demo >/dev/null
	"$bin/cloudprotect-server" serve --listen 127.0.0.1:787 --db "sqlite:$work/server.db" >"$work/server.log" 2>&1 &
	pids+=($!)
	echo '{"participation": "user", "protection": "block"}' >"$work/policy.json"

	# Agent not running.
	"$bin/cloudprotect-tray" >"$work/tray.log" 2>&1 &
	pids+=($!)
	sleep 3
	states_row unreachable "$(label unreachable)"
	menu unreachable

	# Waiting for the person's answer (and the invitation).
	dunstctl close-all
	start_agent
	wait_state '"state":"undecided"'
	wait_tray
	shot invite
	convert "$work/invite.png" -crop 560x340+720+0 +repage "$out/tray-invite-$lang.png"
	states_row undecided "$(label undecided)"
	menu undecided

	# Participating. The agent reports itself limited when it saw an
	# execution it could not identify; then it is asked again, fresh.
	dunstctl close-all
	"$bin/cloudprotect" participate --yes >/dev/null
	wait_state '"state":"participating"'
	wait_tray
	for _ in 1 2 3 4 5; do
		"$bin/cloudprotect" status --json | tr -d ' \n' | grep -q '"limited":false' && break
		stop_agent
		start_agent
		wait_state '"state":"participating"'
		wait_tray
	done
	states_row participating "$(label participating)"
	menu participating

	# Limited: an exec source that cannot see every program.
	stop_agent
	start_agent --exec-source proc-poll
	wait_state '"limited":true'
	wait_tray
	states_row limited "$(label limited)"
	stop_agent
	start_agent
	wait_state '"state":"participating"'
	wait_tray

	# A malicious program blocked: the alert stays, the icon and the menu
	# show it until seen.
	sleep 1
	dunstctl close-all
	cp "$work/invoice-viewer" "$prog"
	sleep 2
	"$prog" 2>/dev/null || true
	sleep 3
	xdotool mousemove 300 700
	shot alert
	convert "$work/alert.png" -crop 560x200+720+0 +repage "$out/tray-alert-$lang.png"
	states_row threat "$(label threat)"
	menu threat

	# Not participating (the alert dismissed first: seen).
	dunstctl close-all
	"$bin/cloudprotect" leave --yes >/dev/null
	wait_state '"state":"declined"'
	sleep 2
	states_row declined "$(label declined)"
	menu declined

	convert "$work"/row-*.png -background white -splice 0x6 -append "$out/tray-states-$lang.png"
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	pids=()
	"$rd" stop "$work/desk"
	echo "screenshots: $lang done: $out/tray-*-$lang.png"
	)
done
cd "$repo"
