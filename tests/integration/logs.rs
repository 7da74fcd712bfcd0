//! What the logs may say: never a secret, and no full email address at info level or above.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{email, track, BASE_MICROS};

use crate::support::{profile_update, Harness, Knobs};

/// Log lines kept in memory, one buffer for the chosen level and above.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn logs_never_show_the_secret_and_mask_emails_at_info_and_above() {
    let everything = Captured::default();
    let info_and_above = Captured::default();
    let worker_only = tracing_subscriber::filter::filter_fn(|meta| {
        meta.target().starts_with("listrak_worker")
            && !meta.target().starts_with("listrak_worker::tools::fake")
    });
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(everything.clone())
                .with_filter(worker_only.clone())
                .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(info_and_above.clone())
                .with_filter(worker_only)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        );
    // The worker's tasks all run on this thread (current-thread runtime), so this default
    // subscriber sees every event they log.
    let _guard = tracing::subscriber::set_default(subscriber);

    let rejected = "rejected.person@example.com";
    let mut h = Harness::new(
        "logs",
        Faults {
            reject_emails: [rejected.to_string()].into(),
            ..Faults::default()
        },
        Knobs::default(),
    )
    .await;
    h.start_worker();
    h.publish(&[
        track(
            "Audience Entered",
            "vip_customers",
            true,
            &email(1),
            1,
            BASE_MICROS,
        ),
        profile_update(1001, rejected, 101, "on", BASE_MICROS),
        track(
            "Audience Entered",
            "vip_customers",
            true,
            "broken@",
            2,
            BASE_MICROS,
        ),
    ])
    .await;
    h.wait_acked(3, Duration::from_secs(30)).await;
    h.fake.expire_tokens();
    h.publish(&[track(
        "Audience Exited",
        "vip_customers",
        false,
        &email(1),
        3,
        BASE_MICROS + 1,
    )])
    .await;
    h.wait_acked(4, Duration::from_secs(30)).await;
    tracing::debug!(
        target: "listrak_worker::settings",
        settings = ?h.settings,
        "effective settings"
    );
    h.finish().await;

    let all = everything.text();
    let visible = info_and_above.text();
    assert!(
        all.contains("dead-lettering"),
        "the test saw the worker's logs: {all}"
    );
    assert!(all.contains("effective settings"));
    let secret = listrak_worker::tools::fake::FakeOptions::default().client_secret;
    assert!(
        !all.contains(&secret),
        "the client secret never appears, even in debug logs"
    );
    assert!(!all.contains("guest:guest"), "nor the broker password");
    for address in [rejected, email(1).as_str()] {
        assert!(
            !visible.contains(address),
            "{address} appears in: {visible}"
        );
    }
    assert!(
        visible.contains("r***@example.com"),
        "the rejected contact is named, masked: {visible}"
    );
}
