#!/bin/sh
# The public image builds redis with protected mode off by default; Debian's is on, which refuses every client
# from another container when no password is set. Same command, same behaviour.
if [ "$1" = "redis-server" ]; then
  exec "$@" --protected-mode no
fi
exec "$@"
