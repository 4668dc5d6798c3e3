#!/bin/sh
# As the public image's docker-entrypoint.sh: started as root with `redis-server ...`, it gives /data to the redis
# user and runs the server as that user (setpriv here, gosu there). The public image builds redis with protected
# mode off by default; Debian's is on, which refuses every client from another container when the default user
# has no password: `--protected-mode no` makes it behave the same.
set -e
if [ "$1" = "redis-server" ] && [ "$(id -u)" = "0" ]; then
  find . \! -user redis -exec chown redis '{}' +
  exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
if [ "$1" = "redis-server" ]; then
  exec "$@" --protected-mode no
fi
exec "$@"
