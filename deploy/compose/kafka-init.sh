#!/bin/sh
# The compose stack's Kafka start (docker-compose.yml, rendered by mpctl/compose.py), run by `sh` as the image's
# user before the image's own start. apache/kafka's start (/etc/kafka/docker/run) formats a new data directory
# with CLUSTER_ID but cannot add a SCRAM credential, and leaves a formatted directory as it is ("already
# formatted"). Every client listener takes SCRAM only, so the admin's verifier must be in the first metadata, or
# no one could ever log in to create the other principals: format here first, once, with `--add-scram`.
set -eu
data="${KAFKA_LOG_DIRS:-/var/lib/kafka/data}"
data="${data%%,*}"
if [ ! -f "$data/meta.properties" ]; then
  umask 077
  conf="$(mktemp)"
  # What formatting reads: the node, its roles, the static quorum and the log directory. The listeners of the
  # real configuration do not reach the storage, so plain ones keep this file free of the TLS and SASL settings.
  cat >"$conf" <<PROPS
process.roles=${KAFKA_PROCESS_ROLES}
node.id=${KAFKA_NODE_ID}
controller.quorum.voters=${KAFKA_CONTROLLER_QUORUM_VOTERS}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://localhost:9092,CONTROLLER://${KAFKA_CONTROLLER_QUORUM_VOTERS#*@}
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=${data}
PROPS
  # The password is read from the mounted secret here, never from the environment or the compose file.
  /opt/kafka/bin/kafka-storage.sh format -t "$CLUSTER_ID" -c "$conf" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$(cat /run/secrets/kafka_admin_password)]"
  rm -f "$conf"
fi
exec /etc/kafka/docker/run
