#!/usr/bin/env bash
# Refreshes socket.io.min.js (and its license) from socket.io-client on npm, unmodified.
# herald embeds it in the binary and serves it at /assets/socket.io.min.js for the page at /.
#
#   web/vendor/update.sh          # the newest 4.8.x
#   web/vendor/update.sh 4.8.4    # an exact version
set -euo pipefail
cd "$(dirname "$0")"

spec="socket.io-client@${1:-~4.8.0}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

tarball="$(npm pack --silent --pack-destination "$tmp" "$spec" | tail -n 1)"
tar -xzf "$tmp/$tarball" -C "$tmp" package/dist/socket.io.min.js package/LICENSE package/package.json
cp "$tmp/package/dist/socket.io.min.js" socket.io.min.js
cp "$tmp/package/LICENSE" socket.io.LICENSE

version="$(node -p "require('$tmp/package/package.json').version")"
head -n 2 socket.io.min.js | grep -q "Socket.IO v$version" || {
  echo "socket.io.min.js does not start with its Socket.IO v$version header" >&2
  exit 1
}
echo "web/vendor/socket.io.min.js is now socket.io-client $version; rebuild herald to embed it"
