#!/bin/sh
# `make run-azure`: Azurite on 127.0.0.1:${AZURITE_PORT:-10000} (kept in
# .cache/azurite-data) and a cryptnbd daemon whose disks are page blobs in
# its container "cryptnbd", with a demo disk. Ctrl-C stops both.
#
#   deploy/azurite/demo.sh bin/cryptnbd [extra serve flags]
set -eu
bin=${1:?usage: demo.sh CRYPTNBD_BINARY [serve flags]}
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
port=${AZURITE_PORT:-10000}
data=${DATA_DIR:-$root/.cache/cryptnbd-azure}
mkdir -p "$root/.cache/azurite-data" "$data"
log="$root/.cache/azurite.log"
: >"$log"
# Its own session, so that Ctrl-C reaches only cryptnbd, which then shuts
# down cleanly (releasing its leases) before Azurite is stopped.
setsid=""
command -v setsid >/dev/null 2>&1 && setsid=setsid
$setsid "$root/deploy/azurite/run.sh" --blobHost 127.0.0.1 --blobPort "$port" --location "$root/.cache/azurite-data" \
	--skipApiVersionCheck --loose --disableTelemetry >"$log" 2>&1 &
azurite=$!
trap 'kill $azurite 2>/dev/null; wait $azurite 2>/dev/null' EXIT
trap ':' INT TERM # wait for cryptnbd, which gets the signal too
i=0
until grep -q "listens on" "$log"; do
	if ! kill -0 $azurite 2>/dev/null; then
		echo "azurite did not start:" >&2
		cat "$log" >&2
		exit 1
	fi
	i=$((i + 1))
	[ $i -lt 3000 ] || { echo "azurite not listening after 10 minutes" >&2; exit 1; }
	sleep 0.2
done
echo "Azurite: http://127.0.0.1:$port/devstoreaccount1 (log: $log)"
# Azurite's documented development account; its key guards nothing.
CRYPTNBD_AZBLOB_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:$port/devstoreaccount1;"
export CRYPTNBD_AZBLOB_CONNECTION_STRING
echo "A second daemon on the same disks: CRYPTNBD_AZBLOB_CONNECTION_STRING='$CRYPTNBD_AZBLOB_CONNECTION_STRING' \\"
echo "  $bin serve --store azblob --azblob-container cryptnbd --data-dir /tmp/cryptnbd-2 --listen 127.0.0.1:10810 --metrics-listen ''"
echo "  (copy $data/platform-key.json into /tmp/cryptnbd-2 first to serve the platform-key disks)"
"$bin" serve --store azblob --azblob-container cryptnbd --data-dir "$data" --demo-disk demo \
	--listen 127.0.0.1:10809 --metrics-listen 127.0.0.1:9090 "$@"
