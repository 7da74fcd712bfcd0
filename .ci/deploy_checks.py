#!/usr/bin/env python3
"""Checks of the deployment files that no off-the-shelf validator makes; run by .ci/check-deploy.

  dashboard-rules DASHBOARD OUT   write the dashboard's queries as a promtool rules file,
                                  after checking the dashboard's structure
  compose FILE                    cross-check a Compose file: dependencies, health checks,
                                  mounted files, build contexts
  kubernetes RENDERED ALERTS      cross-check rendered manifests: selectors, ports, probes,
                                  security context, secrets, grace period, PrometheusRule
  dockerfile DOCKERFILE MANIFEST  the dependency layer has a stand-in for every binary of
                                  the Cargo manifest, and copies what the build reads

`dashboard-rules` and `dockerfile` need only the standard library; the others need PyYAML.
"""

import json
import re
import sys
from pathlib import Path

problems = []


def problem(message):
    problems.append(message)


def finish(what):
    if problems:
        for message in problems:
            print(f"  {what}: {message}", file=sys.stderr)
        sys.exit(1)
    print(f"{what}: consistent")


# --- Grafana ---------------------------------------------------------------------------------

# Grafana's variables, replaced by values PromQL accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
}


def dashboard_rules(path, out):
    dashboard = json.loads(Path(path).read_text())
    ids = set()
    rules = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problem(f"panel id {panel.get('id')} is used twice")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            problem(f"panel {title!r} does not use the ${{DS_PROMETHEUS}} data source")
        targets = panel.get("targets", [])
        if not targets:
            problem(f"panel {title!r} has no query")
        for target in targets:
            expr = target.get("expr", "")
            if not expr.strip():
                problem(f"panel {title!r} has an empty query")
                continue
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            if "$" in expr:
                problem(f"panel {title!r} uses a variable this check does not know: {expr}")
            rules.append({"record": f"dashboard:query_{len(rules) + 1}", "expr": expr})
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    if "DS_PROMETHEUS" not in variables:
        problem("no DS_PROMETHEUS data-source variable")
    if not dashboard.get("uid"):
        problem("the dashboard has no uid (provisioning and links need one)")
    # JSON is YAML: promtool reads this as a rules file and parses every expression.
    Path(out).write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    finish(f"{path} ({len(rules)} queries)")


# --- Compose ---------------------------------------------------------------------------------


def compose(path):
    import yaml

    path = Path(path)
    root = path.parent
    spec = yaml.safe_load(path.read_text())
    services = spec.get("services", {})
    dockerfile = root / "Dockerfile"
    image_has_healthcheck = dockerfile.exists() and "HEALTHCHECK" in dockerfile.read_text()
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            if not (root / context).is_dir():
                problem(f"{name}: build context {context} does not exist")
            target = None if isinstance(build, str) else build.get("target")
            stage = rf"^FROM\s+\S+\s+AS\s+{re.escape(target or '')}\s*$"
            if target and not re.search(stage, dockerfile.read_text(), re.M | re.I):
                problem(f"{name}: builds the Dockerfile stage {target}, which it does not have")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and source.startswith("."):
                if not (root / source).exists():
                    problem(f"{name}: mounts {source}, which does not exist")
        dependencies = service.get("depends_on", {})
        if isinstance(dependencies, list):
            dependencies = {d: {"condition": "service_started"} for d in dependencies}
        for dependency, how in dependencies.items():
            if dependency not in services:
                problem(f"{name}: depends on {dependency}, which is not a service")
                continue
            if how.get("condition") == "service_healthy":
                other = services[dependency]
                check = other.get("healthcheck", {})
                inherited = "build" in other and image_has_healthcheck
                if check.get("disable") or not (check.get("test") or inherited):
                    problem(f"{name}: waits for {dependency} to be healthy, which has no health check")
    finish(str(path))


# --- Kubernetes ------------------------------------------------------------------------------

DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")


def seconds(text):
    match = DURATION.match(text)
    if not match:
        raise ValueError(f"cannot read the duration {text!r}")
    number, unit = int(match.group(1)), match.group(2)
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def kubernetes(rendered, alerts):
    import tomllib

    import yaml

    documents = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    by_kind = {}
    for document in documents:
        by_kind.setdefault(document["kind"], []).append(document)
    if "Secret" in by_kind:
        problem("a Secret is in the manifests: credentials must come from outside the repository")
    for kind in ["Deployment", "Service", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget"]:
        if kind not in by_kind:
            problem(f"no {kind}")
    if problems:
        finish(rendered)

    def named(kind, name):
        return next((d for d in by_kind[kind] if d["metadata"]["name"] == name), by_kind[kind][0])

    deployment = named("Deployment", "listrak-worker")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    if not matches(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        problem("the Deployment's selector does not select its own pods")
    spec = pod["spec"]
    (container,) = spec["containers"]
    port_names = {p.get("name") for p in container.get("ports", [])}
    for probe in ["livenessProbe", "readinessProbe"]:
        http = container.get(probe, {}).get("httpGet")
        if not http:
            problem(f"no HTTP {probe}")
        elif http["port"] not in port_names and http["port"] not in {
            p["containerPort"] for p in container["ports"]
        }:
            problem(f"{probe} probes port {http['port']}, which the container does not name")
    if container.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problem("the liveness probe must be /healthz (a broker outage is no reason to restart)")
    if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problem("the readiness probe must be /readyz")

    security = container.get("securityContext", {})
    if not spec.get("securityContext", {}).get("runAsNonRoot"):
        problem("the pod does not require a non-root user")
    if not security.get("readOnlyRootFilesystem"):
        problem("the root file system is writable")
    if security.get("allowPrivilegeEscalation") is not False:
        problem("privilege escalation is not disallowed")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problem("capabilities are not all dropped")

    env = {e["name"]: e for e in container.get("env", [])}
    for name in ["AMQP_URL", "LISTRAK_CLIENT_ID", "LISTRAK_CLIENT_SECRET"]:
        if "secretKeyRef" not in env.get(name, {}).get("valueFrom", {}):
            problem(f"{name} does not come from a Secret reference")
    for name, entry in env.items():
        if "value" in entry and re.search(r"SECRET|PASSWORD|TOKEN|AMQP_URL", name):
            problem(f"{name} has a literal value in the manifest")

    # The configuration the pod mounts, and its drain time against the kubelet's patience.
    config_maps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    for volume in spec.get("volumes", []):
        name = volume.get("configMap", {}).get("name")
        if name is None:
            continue
        if name not in config_maps:
            problem(f"the pod mounts ConfigMap {name}, which is not in the manifests")
            continue
        settings = tomllib.loads(config_maps[name]["data"]["config.toml"])
        grace = seconds(settings.get("shutdown", {}).get("grace", "30s"))
        waits = spec.get("terminationGracePeriodSeconds", 30)
        if waits < grace + 10:
            problem(
                f"terminationGracePeriodSeconds {waits} leaves under 10s after shutdown.grace {grace:g}s"
            )
        listen_port = int(settings.get("http", {}).get("listen", "0.0.0.0:9464").rsplit(":", 1)[1])
        if listen_port not in {p["containerPort"] for p in container["ports"]}:
            problem(f"the worker listens on {listen_port}, which the container does not expose")

    service = named("Service", "listrak-worker")
    if not matches(service["spec"]["selector"], pod_labels):
        problem("the Service does not select the worker's pods")
    service_ports = {p.get("name") for p in service["spec"]["ports"]}
    monitor = named("ServiceMonitor", "listrak-worker")
    if not matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})):
        problem("the ServiceMonitor does not select the Service")
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in service_ports:
            problem(f"the ServiceMonitor scrapes port {endpoint.get('port')}, which the Service does not name")
    budget = by_kind["PodDisruptionBudget"][0]
    if not matches(budget["spec"]["selector"]["matchLabels"], pod_labels):
        problem("the PodDisruptionBudget does not select the worker's pods")

    rule = by_kind["PrometheusRule"][0]
    if rule["spec"]["groups"] != yaml.safe_load(Path(alerts).read_text())["groups"]:
        problem(f"the PrometheusRule's groups differ from {alerts}")
    finish(rendered)


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile(path, manifest):
    import tomllib

    text = Path(path).read_text()
    cargo = tomllib.loads(Path(manifest).read_text())
    # The layer that builds the dependencies alone: everything before the sources are copied.
    dependency_layer = text.split("COPY src ", 1)[0]
    paths = [target["path"] for target in cargo.get("bin", [])]
    if "lib" in cargo:
        paths.append(cargo["lib"].get("path", "src/lib.rs"))
    for target in paths:
        if not re.search(rf"(>|touch)\s+{re.escape(target)}\b", dependency_layer):
            problem(f"no stand-in for {target} before the sources are copied: cargo cannot resolve the targets")
    if Path(".cargo/config.toml").exists() and "COPY .cargo" not in dependency_layer:
        problem(".cargo/config.toml is not copied before the first build")
    # The stage built by default is the production image: the worker and nothing else.
    production = re.split(r"^FROM\s", text, flags=re.M)[-1]
    for tool in ("listrak-fake", "listrak-bench"):
        if re.search(rf"/{tool}\b", production):
            problem(f"the production stage (the last) carries {tool}")
    if "/out/listrak-worker" not in production:
        problem("the production stage (the last) does not carry listrak-worker")
    finish(path)


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    commands = {
        "dashboard-rules": dashboard_rules,
        "compose": compose,
        "kubernetes": kubernetes,
        "dockerfile": dockerfile,
    }
    if command not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    commands[command](*args)
