//! `reconcile`: what Listrak holds for a list against the newest applied value of each key,
//! from the applied log; a dry run changes nothing, `--apply` repairs what differs.

use std::process::Command;
use std::time::Duration;

use listrak_worker::commands::reconcile::{self, ReconcileOptions};
use listrak_worker::edges::listrak::ListrakClient;
use listrak_worker::edges::telemetry::Metrics;
use listrak_worker::stages::model::ListId;
use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::BASE_MICROS;

use crate::support::{profile_update, settings_text, Harness, Knobs};

const LIST: u32 = 7;
const FIELD: u32 = 3;
const CONTACTS: usize = 200;
const EDITED: usize = 50;

fn email(i: usize) -> String {
    format!("drift-{i}@example.com")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_after_a_clean_sync_is_named_exactly_changed_by_nothing_and_repaired_by_apply() {
    let mut h = Harness::new("reconcile_drift", Faults::default(), Knobs::default()).await;
    let updates: Vec<Vec<u8>> = (0..CONTACTS)
        .map(|i| profile_update(LIST, &email(i), FIELD, "on", BASE_MICROS + i as i64))
        .collect();
    h.publish(&updates).await;
    h.start_worker();
    h.wait_acked(CONTACTS as u64, Duration::from_secs(30)).await;

    // A person edits fields in Listrak's UI; one contact the worker never touched appears.
    for i in 0..EDITED {
        h.fake.edit_field(LIST, &email(i * 4), FIELD, "off");
    }
    h.fake.edit_field(LIST, "stranger@example.com", FIELD, "on");

    let api = ListrakClient::new(&h.settings.listrak, Metrics::new(1)).unwrap();
    let options = ReconcileOptions {
        list: ListId::new(i64::from(LIST)).unwrap(),
        fields: Vec::new(),
        apply: false,
        pages_per_second: 100.0,
    };
    let dry = reconcile::reconcile(&h.settings, h.connection(), &api, &options)
        .await
        .unwrap();
    assert_eq!(dry.checked, CONTACTS as u64);
    assert_eq!(dry.in_sync, (CONTACTS - EDITED) as u64);
    assert_eq!(dry.differs, EDITED as u64);
    assert_eq!(dry.unknown, 1);
    assert_eq!(dry.repaired, 0);
    let mut named: Vec<String> = dry.rows.iter().map(|row| row.email.clone()).collect();
    named.sort();
    let mut edited: Vec<String> = (0..EDITED).map(|i| email(i * 4)).collect();
    edited.sort();
    assert_eq!(named, edited);
    assert!(dry
        .rows
        .iter()
        .all(|row| row.listrak_value.as_deref() == Some("off") && row.newest_value == "on"));
    assert_eq!(
        h.fake.value(LIST, &email(0), FIELD).as_deref(),
        Some("off"),
        "a dry run changes nothing"
    );

    // `history --listrak` says what Listrak holds now beside what was applied.
    let mut told = listrak_worker::commands::history::history(
        h.connection(),
        &h.topology,
        &email(0),
        None,
        None,
    )
    .await
    .unwrap();
    told.listrak = Some(
        listrak_worker::commands::history::listrak_now(&api, &told, &email(0))
            .await
            .unwrap(),
    );
    let held = told.listrak.as_ref().unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].value.as_deref(), Some("off"));
    assert_eq!(held[0].newest, "on");
    let text = listrak_worker::commands::history::table(&told, &email(0));
    assert!(text.contains("NOT the newest applied"), "{text}");

    // The command line gives the same, as JSON.
    let config = std::env::temp_dir().join(format!("reconcile-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        settings_text(
            &h.topology.queue,
            &h.fake.api_url(),
            &h.fake.auth_url(),
            &Knobs::default(),
        ),
    )
    .unwrap();
    let command = {
        let mut command = Command::new(env!("CARGO_BIN_EXE_listrak-worker"));
        command
            .args([
                "reconcile",
                "--list",
                &LIST.to_string(),
                "--json",
                "--config",
            ])
            .arg(&config)
            .env("RUST_LOG", "warn");
        command
    };
    let output = tokio::task::spawn_blocking({
        let mut command = command;
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&config);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["differs"], EDITED);
    assert_eq!(json["rows"].as_array().unwrap().len(), EDITED);

    let applied = reconcile::reconcile(
        &h.settings,
        h.connection(),
        &api,
        &ReconcileOptions {
            apply: true,
            ..options.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(applied.repaired, EDITED as u64);
    h.wait_for(
        "every edited field repaired",
        Duration::from_secs(30),
        |h| (0..CONTACTS).all(|i| h.fake.value(LIST, &email(i), FIELD).as_deref() == Some("on")),
    )
    .await;
    let after = reconcile::reconcile(&h.settings, h.connection(), &api, &options)
        .await
        .unwrap();
    assert_eq!(after.differs, 0);
    h.finish().await;
}
