#!/usr/bin/env python3
"""Stand-in for apache/kafka's /etc/kafka/docker/run: every KAFKA_* environment variable becomes a line of
server.properties as the public image maps it (KAFKA_ dropped, lower case, `___` -> `-`, `__` -> `_`, `_` -> `.`),
the first log directory is formatted with CLUSTER_ID unless it is already (the image tolerates "already
formatted"), then the broker runs in the foreground, with KAFKA_OPTS on the JVM's command line as the image's
kafka-run-class.sh puts it (e.g. -Djava.security.auth.login.config=...)."""

import os
import subprocess
import sys

# Variables of the start scripts, not broker properties (as in the public image).
NOT_PROPERTIES = {
    "KAFKA_HEAP_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_OPTS",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_VERSION",
}
CONFIG = "/opt/kafka/config/server.properties"


def prop(var: str) -> str:
    k = var[len("KAFKA_") :].lower()
    return k.replace("___", "-").replace("__", "\0").replace("_", ".").replace("\0", "_")


def main() -> None:
    props = {
        prop(k): v
        for k, v in sorted(os.environ.items())
        if k.startswith("KAFKA_") and k not in NOT_PROPERTIES
    }
    with open(CONFIG, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in props.items())
    heap = os.environ.get("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m").split()
    java = [
        "java",
        *heap,
        *os.environ.get("KAFKA_OPTS", "").split(),
        "-Dlog4j2.configurationFile=/opt/kafka/config/log4j2.xml",
        "-cp",
        "/opt/kafka/libs/*",
    ]
    log_dir = props.get("log.dirs", "/tmp/kraft-combined-logs").split(",")[0]
    if not os.path.exists(os.path.join(log_dir, "meta.properties")):
        cluster = os.environ.get("CLUSTER_ID")
        if not cluster:
            sys.exit("CLUSTER_ID is not set: the log directory cannot be formatted")
        subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster, "-c", CONFIG], check=True)
    os.execvp("java", [*java, "kafka.Kafka", CONFIG])


if __name__ == "__main__":
    main()
