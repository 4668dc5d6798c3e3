#!/bin/sh
# The compose stack's Redis start (docker-compose.yml, rendered by mpctl/compose.py), run by `sh` as root before
# the image's own entrypoint. Its ACL file lives on the data volume, so that the users the topics job gives it
# (ACL SETUSER, then ACL SAVE) survive a restart. At each start the `default` user (off) and the admin come from
# the secret redis_users (`mpctl compose init-bus`); every other user the file holds is kept.
set -eu
umask 077
acl=/data/users.acl
{
  cat /run/secrets/redis_users.acl
  if [ -f "$acl" ]; then
    grep -v -e '^user default ' -e '^user admin ' "$acl" || true
  fi
} >"$acl.new"
mv "$acl.new" "$acl"
# The image's entrypoint: gives /data to the redis user and starts the server as that user.
exec docker-entrypoint.sh "$@"
