#!/usr/bin/env python3
"""Static checks of the Kubernetes examples in this folder (no cluster).

Parses every *.yaml with yaml.safe_load_all and checks what a typo would
break: required fields, selectors that match their pod templates,
Services that select a workload and name existing container ports, probe
ports, the StatefulSet's governing Service, JetStream on, and the
meshwire probes on /healthz and /readyz. Exit 0 and "N passed, 0 failed"
when all hold; exit 2 when PyYAML is missing.
"""
import pathlib
import sys

try:
    import yaml
except ImportError:
    print("SKIPPED: PyYAML is not installed")
    sys.exit(2)

HERE = pathlib.Path(__file__).resolve().parent
failures = []
passed = 0


def check(condition, what):
    global passed
    if condition:
        passed += 1
    else:
        failures.append(what)


docs = []
for path in sorted(HERE.glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is not None:
            docs.append((path.name, doc))

check(len(docs) > 0, "no manifests found")
kinds = {}
for name, doc in docs:
    where = f"{name}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    for field in ("apiVersion", "kind", "metadata"):
        check(field in doc, f"{where}: missing {field}")
    check(bool((doc.get("metadata") or {}).get("name")), f"{where}: metadata.name")
    kinds.setdefault(doc.get("kind"), []).append((where, doc))

workloads = kinds.get("Deployment", []) + kinds.get("StatefulSet", [])
check(len(kinds.get("Deployment", [])) >= 1, "no Deployment")
check(len(kinds.get("StatefulSet", [])) >= 1, "no StatefulSet")
check(len(kinds.get("Service", [])) >= 2, "fewer than two Services")

pod_labels = []
for where, doc in workloads:
    spec = doc.get("spec") or {}
    match = (spec.get("selector") or {}).get("matchLabels") or {}
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    check(bool(match), f"{where}: spec.selector.matchLabels")
    check(all(labels.get(k) == v for k, v in match.items()), f"{where}: selector does not match the template labels")
    containers = (template.get("spec") or {}).get("containers") or []
    check(len(containers) >= 1, f"{where}: no containers")
    ports = set()
    for c in containers:
        check(bool(c.get("name")) and bool(c.get("image")), f"{where}: container name/image")
        for p in c.get("ports") or []:
            check(isinstance(p.get("containerPort"), int), f"{where}: containerPort must be an integer")
            if p.get("name"):
                ports.add(p["name"])
        for probe in ("readinessProbe", "livenessProbe"):
            get = (c.get(probe) or {}).get("httpGet")
            if get:
                check(get.get("port") in ports or isinstance(get.get("port"), int), f"{where}: {probe} port {get.get('port')}")
    pod_labels.append((where, doc, labels, ports, containers))
    if doc["kind"] == "StatefulSet":
        service = spec.get("serviceName")
        check(any(s["metadata"]["name"] == service for _, s in kinds.get("Service", [])), f"{where}: serviceName {service} has no Service")
        args = " ".join(a for c in containers for a in (c.get("args") or []))
        check("--jetstream" in args, f"{where}: JetStream is not enabled")

for where, svc in kinds.get("Service", []):
    selector = (svc.get("spec") or {}).get("selector") or {}
    matched = [w for w in pod_labels if all(w[2].get(k) == v for k, v in selector.items())]
    check(bool(selector) and len(matched) == 1, f"{where}: selector matches {len(matched)} workloads")
    for p in (svc.get("spec") or {}).get("ports") or []:
        check(isinstance(p.get("port"), int), f"{where}: port must be an integer")
        target = p.get("targetPort", p.get("port"))
        if matched and isinstance(target, str):
            check(target in matched[0][3], f"{where}: targetPort {target} is no container port")

for where, doc, _, _, containers in pod_labels:
    if doc["kind"] == "Deployment":
        paths = {(c.get(p) or {}).get("httpGet", {}).get("path") for c in containers for p in ("readinessProbe", "livenessProbe")}
        check({"/healthz", "/readyz"} <= paths, f"{where}: probes {paths}")
        volumes = {v["name"]: v for v in (doc["spec"]["template"]["spec"].get("volumes") or [])}
        for c in containers:
            for m in c.get("volumeMounts") or []:
                check(m["name"] in volumes, f"{where}: volumeMount {m['name']} has no volume")
                cm = (volumes.get(m["name"]) or {}).get("configMap", {}).get("name")
                if cm:
                    check(any(x["metadata"]["name"] == cm for _, x in kinds.get("ConfigMap", [])), f"{where}: ConfigMap {cm} missing")

for where, cm in kinds.get("ConfigMap", []):
    for key, text in (cm.get("data") or {}).items():
        if key.endswith(".toml"):
            try:
                import tomllib
            except ImportError:
                continue
            try:
                tomllib.loads(text)
                check(True, "")
            except tomllib.TOMLDecodeError as e:
                check(False, f"{where}: {key} is not TOML: {e}")

for failure in failures:
    print("FAIL", failure)
print(f"{passed} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
