// Reads a JSON array of Kubernetes objects on stdin; validates each Strimzi resource with the validator that
// @kubernetes-models/strimzi-kafka-operator compiled from Strimzi's own CRD schemas. Prints a JSON array of
// {kind, name, ok, error}; exits 1 if any object is invalid or has no schema, 2 on bad input.
import { readFileSync } from "node:fs";

const PKG = "@kubernetes-models/strimzi-kafka-operator";

async function validateOne(doc) {
  const [group, version] = String(doc.apiVersion ?? "").split("/");
  const name = doc?.metadata?.name ?? null;
  const kind = String(doc.kind ?? "");
  if (group !== "kafka.strimzi.io" || !version || !/^[A-Za-z0-9]+$/.test(kind)) {
    return { kind, name, ok: false, error: `not a Strimzi kafka.strimzi.io resource: ${doc.apiVersion} ${kind}` };
  }
  let cls;
  try {
    cls = (await import(`${PKG}/${group}/${version}/${kind}`))[kind];
  } catch (e) {
    return { kind, name, ok: false, error: `no schema for ${doc.apiVersion} ${kind}` };
  }
  try {
    new cls(doc).validate();
    return { kind, name, ok: true, error: null };
  } catch (e) {
    return { kind, name, ok: false, error: String(e.message ?? e) };
  }
}

let docs;
try {
  docs = JSON.parse(readFileSync(0, "utf8"));
} catch (e) {
  console.error(`input is not JSON: ${e.message}`);
  process.exit(2);
}
const results = [];
for (const doc of docs) results.push(await validateOne(doc));
console.log(JSON.stringify(results));
process.exit(results.every((r) => r.ok) ? 0 : 1);
