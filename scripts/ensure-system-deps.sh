#!/usr/bin/env bash
# Make sure the system tools the local infrastructure needs are present (run by the Makefile before tests).
#   - Java 17+ and Maven: needed to fetch and run the real Apache Kafka broker. Not installed here: a JDK is a
#     deliberate choice of the machine's owner, so we only report what is missing.
#   - redis-server: installed with apt-get when missing and we are root (Debian's package; it does not
#     auto-start, mpctl starts it on its own port).
# Idempotent: does nothing when everything is already there. Skips Redis when REDIS_URL points elsewhere
# and Java/Maven when KAFKA_BOOTSTRAP_SERVERS does.
set -euo pipefail

fail() { echo "ensure-system-deps: $*" >&2; exit 1; }

if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
  java_bin="${JAVA_HOME:+$JAVA_HOME/bin/java}"
  [[ -n "$java_bin" && -x "$java_bin" ]] || java_bin="$(command -v java || true)"
  [[ -n "$java_bin" ]] || fail "java not found; Kafka 4.1.1 needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless)"
  version_line="$("$java_bin" -version 2>&1 | head -n1)"
  major="$(sed -E 's/.*version "([0-9]+)(\.([0-9]+))?.*/\1 \3/' <<<"$version_line")"
  read -r first second <<<"$major"
  [[ "$first" == "1" ]] && first="${second:-0}"   # "1.8.0" style
  [[ "$first" =~ ^[0-9]+$ ]] || fail "cannot read the Java version from: $version_line"
  (( first >= 17 )) || fail "Java 17+ needed, found Java $first ($java_bin)"
  command -v mvn >/dev/null || fail "mvn not found; needed once to fetch the Kafka jars (Debian: apt-get install maven)"
fi

if [[ -z "${REDIS_URL:-}" ]] && ! command -v redis-server >/dev/null && [[ ! -x /usr/bin/redis-server ]]; then
  if [[ "$(id -u)" -ne 0 ]]; then
    fail "redis-server not installed; run: sudo apt-get install redis-server (or set REDIS_URL)"
  fi
  command -v apt-get >/dev/null || fail "redis-server not installed and apt-get is not available"
  echo "ensure-system-deps: installing redis-server with apt-get..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  command -v redis-server >/dev/null || fail "apt-get install redis-server did not provide redis-server"
fi
