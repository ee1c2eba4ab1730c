#!/bin/sh
# Runs the pinned Azurite blob service (the Azure Storage emulator),
# installing it with npm into the repository's git-ignored .cache/azurite on
# first use. Arguments are passed to azurite-blob, for example:
#
#   deploy/azurite/run.sh --blobHost 127.0.0.1 --blobPort 10000 --inMemoryPersistence
#
# `run.sh --install` only installs. Used by `make test-deps`, `make
# run-azure` and the Azurite tests (cryptodisk/blobstore/azuritetest), so
# the version below is the only place it is pinned.
set -eu
AZURITE_VERSION="${AZURITE_VERSION:-3.37.0}"
root=$(cd "$(dirname "$0")/../.." && pwd)
prefix="$root/.cache/azurite"
if ! grep -qs "\"version\": \"$AZURITE_VERSION\"" "$prefix/node_modules/azurite/package.json"; then
	command -v npm >/dev/null 2>&1 || { echo "azurite: npm not found: install Node.js and npm" >&2; exit 127; }
	echo "installing azurite@$AZURITE_VERSION into $prefix" >&2
	npm install --prefix "$prefix" --no-audit --no-fund "azurite@$AZURITE_VERSION" >&2
fi
[ "${1:-}" = --install ] && exit 0
exec "$prefix/node_modules/.bin/azurite-blob" "$@"
