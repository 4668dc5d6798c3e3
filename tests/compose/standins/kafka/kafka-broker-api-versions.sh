#!/bin/sh
# As Apache Kafka's bin/kafka-broker-api-versions.sh: the tool's class on the broker's classpath, KAFKA_OPTS included.
# shellcheck disable=SC2086
exec java -Xmx128m ${KAFKA_OPTS:-} -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.xml -cp '/opt/kafka/libs/*' \
  org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
