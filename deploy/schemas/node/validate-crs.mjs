// Validates prometheus-operator custom resources (JSON files given as arguments, one object
// each) against the CRD OpenAPI schemas shipped in @kubernetes-models/prometheus-operator.
// Prints one line per file; exits 1 if any is invalid or of an unknown kind.
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { PodMonitor, ServiceMonitor, PrometheusRule };
let failed = 0;
for (const file of process.argv.slice(2)) {
  const doc = JSON.parse(readFileSync(file, "utf8"));
  const Model = models[doc.kind];
  if (!Model || doc.apiVersion !== "monitoring.coreos.com/v1") {
    console.log(`INVALID ${file}: unknown kind ${doc.apiVersion}/${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`VALID ${file}: ${doc.kind}/${doc.metadata?.name}`);
  } catch (err) {
    console.log(`INVALID ${file}: ${err.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
