//! The configurations shipped under `deploy/` load, and agree with the files around them.

use std::path::PathBuf;
use std::time::Duration;

use listrak_worker::config::Settings;
use listrak_worker::stages::decode::decode;
use listrak_worker::stages::mapping::plan;
use listrak_worker::stages::model::EventTime;

fn repository_file(path: &str) -> String {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Loads a shipped configuration with the credentials a deployment passes in the environment.
fn load(path: &str) -> Settings {
    let text = repository_file(path);
    Settings::from_toml(&text, |name| match name {
        "AMQP_URL" => Some("amqp://user:password@rabbitmq:5672/%2f".into()),
        "LISTRAK_CLIENT_ID" => Some("client-id".into()),
        "LISTRAK_CLIENT_SECRET" => Some("client-secret".into()),
        _ => None,
    })
    .unwrap_or_else(|error| panic!("{path} is refused: {error}"))
}

/// The number after `key:` in a YAML file, e.g. `terminationGracePeriodSeconds: 60`.
fn yaml_number(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{key} is not a number: {e}"))
}

#[test]
fn every_shipped_configuration_loads_and_serves_metrics_on_the_port_the_manifests_probe() {
    for path in [
        "deploy/compose/config.toml",
        "deploy/kubernetes/base/config.toml",
        "deploy/kubernetes/overlays/production/config.toml",
    ] {
        let settings = load(path);
        assert_eq!(settings.http.listen.port(), 9464, "{path}: http.listen");
    }
    let dockerfile = repository_file("Dockerfile");
    assert!(dockerfile.contains("EXPOSE 9464"));
    let deployment = repository_file("deploy/kubernetes/base/deployment.yaml");
    assert_eq!(yaml_number(&deployment, "containerPort"), 9464);
}

#[test]
fn kubernetes_waits_longer_than_the_worker_drains() {
    let deployment = repository_file("deploy/kubernetes/base/deployment.yaml");
    let kubelet_waits =
        Duration::from_secs(yaml_number(&deployment, "terminationGracePeriodSeconds"));
    for path in [
        "deploy/kubernetes/base/config.toml",
        "deploy/kubernetes/overlays/production/config.toml",
    ] {
        let grace = load(path).shutdown.grace;
        // Closing the channel and connection after the drain takes a moment too.
        assert!(
            grace + Duration::from_secs(10) <= kubelet_waits,
            "{path}: shutdown.grace {grace:?} leaves too little of terminationGracePeriodSeconds \
             {kubelet_waits:?}"
        );
    }
}

#[test]
fn every_compose_sample_event_is_applied_but_the_one_unmapped_audience() {
    let settings = load("deploy/compose/config.toml");
    let samples = repository_file("deploy/compose/samples/events.jsonl");
    let mut ignored = Vec::new();
    let mut updates = 0;
    for (number, line) in samples.lines().enumerate() {
        let inbound = decode(line.as_bytes(), EventTime::now())
            .unwrap_or_else(|poison| panic!("line {}: {poison:?}", number + 1));
        let planned = plan(&inbound, &settings.mappings, &())
            .unwrap_or_else(|poison| panic!("line {}: {poison:?}", number + 1))
            .updates;
        if planned.is_empty() {
            ignored.push(number + 1);
        }
        updates += planned.len();
    }
    assert_eq!(ignored.len(), 1, "ignored lines: {ignored:?}");
    assert!(
        updates > samples.lines().count(),
        "some events feed two lists"
    );
}
