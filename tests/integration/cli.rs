//! The command line: configuration errors, `check`, `publish`.

use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_listrak-worker"))
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("listrak-worker-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

const VALID: &str = r#"
[listrak]
client_id = "id"
client_secret = "very-secret-value"

[[mappings]]
name = "vip"
events = ["Audience Entered", "Audience Exited"]
list_id = 12345
profile_fields = { "456" = "useAudienceKey" }
"#;

#[test]
fn check_prints_the_effective_configuration_without_the_secret() {
    let path = write_config("valid", VALID);
    let output = worker()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("list_id = 12345"), "{stdout}");
    assert!(stdout.contains("[redacted]"));
    assert!(!stdout.contains("very-secret-value"));
    assert!(
        !stdout.contains("guest:guest"),
        "the broker password is redacted too"
    );
}

#[test]
fn check_takes_several_broker_urls_from_the_environment_and_redacts_every_password() {
    let path = write_config("several-urls", VALID);
    let output = worker()
        .args(["check", "--config"])
        .arg(&path)
        .env(
            "AMQP_URL",
            "amqp://worker:first-password@rabbit-0:5672/%2f,\
             amqp://worker:second-password@rabbit-1:5672/%2f",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stdout.contains(
            "url = [\"amqp://worker:[redacted]@rabbit-0:5672/%2f\", \
             \"amqp://worker:[redacted]@rabbit-1:5672/%2f\"]"
        ),
        "{stdout}"
    );
    for text in [&stdout, &stderr] {
        assert!(!text.contains("first-password"), "{text}");
        assert!(!text.contains("second-password"), "{text}");
    }

    let refused = worker()
        .args(["check", "--config"])
        .arg(&path)
        .env(
            "AMQP_URL",
            "amqp://worker:first-password@rabbit-0/%2f,\
             amqp://worker:second-password@rabbit-1/other",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("amqp.url") && stderr.contains("vhost"),
        "{stderr}"
    );
    assert!(!stderr.contains("password"), "{stderr}");
}

#[test]
fn a_bad_configuration_is_refused_with_exit_2_naming_the_key() {
    let cases = [
        (
            VALID.replace("\"456\"", "\"-4\""),
            "mappings[0].profile_fields",
        ),
        (
            format!("{VALID}\n[batch]\nmax_wait = \"soon\"\n"),
            "batch.max_wait",
        ),
        (
            format!("{VALID}\n[batch]\nmax_contact = 5\n"),
            "batch.max_contact",
        ),
        (
            VALID.split("[[mappings]]").next().unwrap().to_string(),
            "mappings",
        ),
        (
            format!(
                "[amqp]\nurl = \"amqps://rabbit.internal/%2f\"\n[amqp.tls]\nca_file = \
                 \"/nonexistent/ca.pem\"\n{VALID}"
            ),
            "amqp.tls.ca_file",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = write_config(&format!("bad{i}"), text);
        let output = worker()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "case {i}: {stderr}");
        assert!(stderr.contains(key), "case {i}: {stderr} should name {key}");
        assert!(!stderr.contains("very-secret-value"));
    }
}

#[test]
fn environment_variables_override_the_file() {
    let path = write_config("env", VALID);
    let output = worker()
        .args(["check", "--config"])
        .arg(&path)
        .env("LISTRAK_API_URL", "http://127.0.0.1:9/email/v1")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("http://127.0.0.1:9/email/v1"));
}

#[test]
fn an_unknown_command_is_a_usage_error() {
    let output = worker().arg("frobnicate").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_auth_obtains_a_token_and_says_why_when_it_cannot() {
    let fake = listrak_worker::tools::fake::FakeServer::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        listrak_worker::tools::fake::FakeOptions::default(),
    )
    .await
    .unwrap();
    let credentials = listrak_worker::tools::fake::FakeOptions::default();
    let path = write_config("auth", VALID);
    let run = |secret: String| {
        let mut command = worker();
        command
            .args(["check", "--auth", "--config"])
            .arg(&path)
            .env("LISTRAK_AUTH_URL", fake.auth_url())
            .env("LISTRAK_CLIENT_ID", &credentials.client_id)
            .env("LISTRAK_CLIENT_SECRET", secret);
        tokio::task::spawn_blocking(move || command.output().unwrap())
    };

    let ok = run(credentials.client_secret.clone()).await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("authentication: ok"));
    assert_eq!(fake.tokens_issued(), 1);

    let refused = run("not-the-secret".into()).await.unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr.contains("authentication failed") && stderr.contains("401"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-secret"));
    fake.shutdown().await;
}
