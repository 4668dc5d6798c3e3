#!/bin/sh
# As Apache Kafka's bin/kafka-storage.sh: the storage tool's class on the broker's classpath, KAFKA_OPTS included.
# shellcheck disable=SC2086
exec java -Xmx256m ${KAFKA_OPTS:-} -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.xml -cp '/opt/kafka/libs/*' \
  kafka.tools.StorageTool "$@"
