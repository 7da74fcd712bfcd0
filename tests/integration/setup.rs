//! Setting up Listrak from the command line against listrak-fake's catalogue: `listrak
//! lists | fields | provision`, `check --listrak`, `listrak.verify_at_start`, and the
//! provisioned mappings end to end.

use std::net::SocketAddr;
use std::time::Duration;

use listrak_worker::config::Settings;
use listrak_worker::tools::fake::{
    CatalogueSeed, FakeOptions, FakeServer, SeedField, SeedGroup, SeedList,
};
use listrak_worker::tools::sample::{track, BASE_MICROS};

use crate::support::{Harness, Knobs, ListrakConfig, WorkerProcess};

/// List 1001 with a group holding a Check Box and a short Text field; list 2002 empty.
fn catalogue() -> CatalogueSeed {
    CatalogueSeed {
        lists: vec![
            SeedList {
                list_id: 1001,
                list_name: "Customers".into(),
                groups: vec![SeedGroup {
                    segmentation_field_group_id: 10,
                    segmentation_field_group_name: "Preferences".into(),
                    fields: vec![
                        SeedField {
                            segmentation_field_id: 101,
                            segmentation_field_name: "vip_customers".into(),
                            data_type: "CheckBox".into(),
                            max_length: 3,
                        },
                        SeedField {
                            segmentation_field_id: 102,
                            segmentation_field_name: "Favourite colour".into(),
                            data_type: "Text".into(),
                            max_length: 12,
                        },
                    ],
                }],
            },
            SeedList {
                list_id: 2002,
                list_name: "Newsletter".into(),
                groups: vec![],
            },
        ],
    }
}

async fn fake_with_catalogue() -> FakeServer {
    crate::support::init_logging();
    FakeServer::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        FakeOptions {
            catalogue: catalogue(),
            ..FakeOptions::default()
        },
    )
    .await
    .expect("listrak-fake starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const VIP_MAPPING: &str = r#"
[[mappings]]
name = "vip"
events = ["Audience Entered", "Audience Exited"]
audience_key = "vip_customers"
list_id = 1001
profile_fields = { "101" = "useAudienceKey", "102" = "blue" }
"#;

#[tokio::test]
async fn lists_and_fields_show_what_listrak_holds_as_tables_and_json() {
    let fake = fake_with_catalogue().await;
    // No mappings yet: looking at the account comes before writing them.
    let config = ListrakConfig::new(&fake, "setup-look", "");

    let lists = config.run(&["listrak", "lists"]).await;
    assert!(lists.status.success(), "{}", text(&lists.stderr));
    let stdout = text(&lists.stdout);
    assert!(stdout.contains("1001  Customers"), "{stdout}");
    assert!(stdout.contains("2002  Newsletter"), "{stdout}");

    let fields = config.run(&["listrak", "fields", "--list", "1001"]).await;
    assert!(fields.status.success(), "{}", text(&fields.stderr));
    let stdout = text(&fields.stdout);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|line| {
            line.split("  ")
                .map(str::trim)
                .filter(|cell| !cell.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(rows[0], ["GROUP", "FIELD", "NAME", "TYPE", "MAX LENGTH"]);
    assert_eq!(
        rows[1],
        ["Preferences (10)", "101", "vip_customers", "CheckBox", "3"]
    );
    assert_eq!(
        rows[2],
        ["Preferences (10)", "102", "Favourite colour", "Text", "12"]
    );

    let json = config
        .run(&["listrak", "fields", "--list", "1001", "--json"])
        .await;
    assert!(json.status.success(), "{}", text(&json.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(answer["list"], 1001);
    assert_eq!(answer["groups"][0]["fields"][1]["id"], 102);
    assert_eq!(answer["groups"][0]["fields"][1]["data_type"], "Text");
    assert_eq!(answer["groups"][0]["fields"][1]["max_length"], 12);

    let missing = config.run(&["listrak", "fields", "--list", "999"]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("list 999 does not exist"),
        "{}",
        text(&missing.stderr)
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn check_listrak_names_each_mapping_problem_and_exits_2() {
    let fake = fake_with_catalogue().await;
    let faulty = r#"
[[mappings]]
name = "wrong-field"
events = ["Audience Entered", "Audience Exited"]
audience_key = "vip_customers"
list_id = 1001
profile_fields = { "109" = "useAudienceKey" }

[[mappings]]
name = "text-to-check-box"
types = ["identify"]
list_id = 1001
profile_fields = { "101" = "gold" }

[[mappings]]
name = "missing-list"
events = ["Audience Entered"]
list_id = 999
profile_fields = { "101" = "on" }
"#;
    let config = ListrakConfig::new(&fake, "setup-faulty", faulty);
    let output = config.run(&["check", "--listrak"]).await;
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{stdout}{}",
        text(&output.stderr)
    );
    let problems: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("problem: "))
        .collect();
    assert_eq!(problems.len(), 3, "{stdout}");
    assert!(
        problems[0].contains(concat!(
            r#"mapping "wrong-field": profile_fields."109": "#,
            r#"field 109 is not a profile field of list 1001; "#,
            r#"did you mean field 101 ("vip_customers", CheckBox)?"#
        )),
        "{stdout}"
    );
    assert!(
        problems[1].contains(concat!(
            r#"mapping "text-to-check-box": profile_fields."101": "#,
            r#""gold" is written to field 101 ("vip_customers"), a Check Box field"#
        )),
        "{stdout}"
    );
    assert!(
        problems[2].contains(concat!(
            r#"mapping "missing-list": list_id: list 999 does not exist; "#,
            r#"the account has 1001 (Customers), 2002 (Newsletter)"#
        )),
        "{stdout}"
    );
    assert!(text(&output.stderr).contains("3 problem(s)"));

    let correct = ListrakConfig::new(&fake, "setup-correct", VIP_MAPPING);
    let output = correct.run(&["check", "--listrak"]).await;
    assert!(
        output.status.success(),
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(text(&output.stdout)
        .contains("# listrak: 1 mapping(s) checked against the account, 0 problem(s)"));
    fake.shutdown().await;
}

fn provision_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "listrak",
        "provision",
        "--list",
        "2002",
        "--group",
        "Engage Audiences",
        "--audience",
        "vip_customers",
        "--audience",
        "cart_abandoners",
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test]
async fn provision_creates_each_field_once_and_its_mappings_land_on_those_fields() {
    let mut h = Harness::with_fake(
        "setup_provision",
        FakeOptions {
            catalogue: catalogue(),
            ..FakeOptions::default()
        },
        Knobs::default(),
    )
    .await;
    let config = ListrakConfig::new(&h.fake, "setup-provision", VIP_MAPPING);

    let dry = config.run(&provision_args(&["--dry-run"])).await;
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(text(&dry.stderr).contains("group \"Engage Audiences\" would create"));
    assert_eq!(text(&dry.stdout), "", "a dry run prints no mappings");
    assert!(
        h.fake.catalogue().lists[1].groups.is_empty(),
        "a dry run creates nothing"
    );

    let first = config.run(&provision_args(&[])).await;
    assert!(first.status.success(), "{}", text(&first.stderr));
    let second = config.run(&provision_args(&[])).await;
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_eq!(
        text(&first.stdout),
        text(&second.stdout),
        "the same mappings again"
    );
    assert!(text(&second.stderr).contains("group \"Engage Audiences\" exists"));
    assert!(
        !text(&second.stderr).contains("created"),
        "{}",
        text(&second.stderr)
    );

    let list = h.fake.catalogue().lists[1].clone();
    assert_eq!(list.groups.len(), 1, "{list:?}");
    let names: Vec<&str> = list.groups[0]
        .fields
        .iter()
        .map(|field| field.segmentation_field_name.as_str())
        .collect();
    assert_eq!(names, ["vip_customers", "cart_abandoners"]);
    assert!(list.groups[0]
        .fields
        .iter()
        .all(|field| field.data_type == "CheckBox"));

    // The printed tables, pasted into the configuration, pass the check and run.
    let printed = text(&first.stdout);
    let pasted = ListrakConfig::new(&h.fake, "setup-pasted", &printed);
    let check = pasted.run(&["check", "--listrak"]).await;
    assert!(
        check.status.success(),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    let parsed = Settings::load(Some(pasted.path()), |_| None).unwrap();
    h.settings.mappings = parsed.mappings;
    h.start_worker();
    let field = |name: &str| {
        list.groups[0]
            .fields
            .iter()
            .find(|field| field.segmentation_field_name == name)
            .unwrap()
            .segmentation_field_id
    };
    h.publish(&[
        track(
            "Audience Entered",
            "vip_customers",
            true,
            "a@example.com",
            1,
            BASE_MICROS,
        ),
        track(
            "Audience Entered",
            "cart_abandoners",
            true,
            "b@example.com",
            2,
            BASE_MICROS,
        ),
        track(
            "Audience Exited",
            "cart_abandoners",
            false,
            "a@example.com",
            3,
            BASE_MICROS,
        ),
        track(
            "Audience Entered",
            "high_spenders",
            true,
            "c@example.com",
            4,
            BASE_MICROS,
        ),
    ])
    .await;
    h.wait_acked(4, Duration::from_secs(30)).await;
    assert_eq!(
        h.fake
            .value(2002, "a@example.com", field("vip_customers"))
            .as_deref(),
        Some("on")
    );
    assert_eq!(
        h.fake
            .value(2002, "b@example.com", field("cart_abandoners"))
            .as_deref(),
        Some("on")
    );
    assert_eq!(
        h.fake
            .value(2002, "a@example.com", field("cart_abandoners"))
            .as_deref(),
        Some("off")
    );
    assert_eq!(h.acked_as("ignored"), 1);
    assert_eq!(
        h.metrics.sample(
            "listrak_unmapped_audience_events_total",
            &[("audience_key", "high_spenders")]
        ),
        1.0
    );
    h.finish().await;
}

#[tokio::test]
async fn the_fake_refuses_an_update_naming_a_field_its_list_does_not_have() {
    let mut h = Harness::with_fake(
        "setup_unknown_field",
        FakeOptions {
            catalogue: catalogue(),
            ..FakeOptions::default()
        },
        Knobs::default(),
    )
    .await;
    // The demo's mappings write to fields 101 and 102 of list 1001, which exist, and to
    // fields of list 2002, which has none: cart abandoners reach both lists, and the update
    // to list 2002 is rejected.
    h.start_worker();
    h.publish(&[
        track(
            "Audience Entered",
            "vip_customers",
            true,
            "a@example.com",
            1,
            BASE_MICROS,
        ),
        track(
            "Audience Entered",
            "cart_abandoners",
            true,
            "b@example.com",
            2,
            BASE_MICROS,
        ),
    ])
    .await;
    h.wait_acked(2, Duration::from_secs(30)).await;
    assert_eq!(
        h.fake.value(1001, "a@example.com", 101).as_deref(),
        Some("on")
    );
    let refused: Vec<_> = h
        .fake
        .requests()
        .into_iter()
        .filter(|request| request.status == 400)
        .collect();
    assert!(!refused.is_empty());
    assert!(refused
        .iter()
        .all(|request| request.list_id == Some(2002)
            && request.error == Some("ERROR_INVALID_PARAMETER")));
    let letters = h.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("x-listrak-reason"), Some("rejected"));
    assert!(
        letters[0]
            .header("x-listrak-message")
            .is_some_and(|message| message.contains("is not a profile field of list 2002")),
        "{:?}",
        letters[0].headers
    );
    h.finish().await;
}

#[tokio::test]
async fn verify_at_start_refuses_to_run_on_a_problem_with_exit_2() {
    let h = Harness::with_fake(
        "setup_verify_at_start",
        FakeOptions {
            catalogue: catalogue(),
            ..FakeOptions::default()
        },
        Knobs::default(),
    )
    .await;
    let knobs = Knobs {
        verify_at_start: true,
        ..Knobs::default()
    };
    let (status, stderr) =
        WorkerProcess::run_to_exit(&h, "verify", &knobs, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(concat!(
            r#"mapping "cart-abandoners-on-the-second-list": profile_fields."201": "#,
            r#"field 201 is not a profile field of list 2002"#
        )),
        "{stderr}"
    );
    h.finish().await;
}

#[tokio::test]
async fn provision_refuses_bad_requests_with_exit_2_and_creates_nothing() {
    let fake = fake_with_catalogue().await;
    let config = ListrakConfig::new(&fake, "setup-refused", VIP_MAPPING);
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--list",
                "2002",
                "--group",
                "G",
                "--audience",
                "a",
                "--audience",
                "b",
                "--name",
                "X",
            ],
            "--name names one field, but 2 audiences were given",
        ),
        (
            &["--list", "999", "--group", "G", "--audience", "a"],
            "list 999 does not exist",
        ),
        (
            &[
                "--list",
                "1001",
                "--group",
                "Preferences",
                "--audience",
                "Favourite colour",
            ],
            "already exists in group \"Preferences\" as field 102, but it is a Text field",
        ),
    ];
    for (args, expected) in cases {
        let mut command = vec!["listrak", "provision"];
        command.extend_from_slice(args);
        let output = config.run(&command).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert!(
            text(&output.stderr).contains(expected),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert_eq!(text(&output.stdout), "", "{args:?}");
    }
    assert_eq!(fake.catalogue(), catalogue(), "nothing was created");

    let lists = config.run(&["listrak", "lists", "--json"]).await;
    let lists: serde_json::Value = serde_json::from_slice(&lists.stdout).unwrap();
    assert_eq!(
        lists,
        serde_json::json!([{"id": 1001, "name": "Customers"}, {"id": 2002, "name": "Newsletter"}])
    );
    fake.shutdown().await;
}
