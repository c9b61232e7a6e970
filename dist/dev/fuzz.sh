#!/usr/bin/env bash
# Runs every Go fuzz target in the module for the given time each
# (default 10s): `make fuzz FUZZTIME=10m` for a long local run.
set -euo pipefail
fuzztime=${1:-10s}
cd "$(dirname "$0")/../.."
status=0
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for target in $(grep -hoE '^func (Fuzz[A-Za-z0-9_]+)\(' "$dir"/*_test.go 2>/dev/null | sed -E 's/^func (Fuzz[A-Za-z0-9_]+)\(/\1/' | sort -u); do
		echo "fuzz: $pkg $target for $fuzztime"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" || status=1
	done
done
exit $status
