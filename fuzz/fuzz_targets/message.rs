//! A message body: decoded into an event (or poison), then mapped by the sample mappings.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use listrak_worker::config::Settings;
use listrak_worker::stages::decode::decode;
use listrak_worker::stages::mapping::plan;
use listrak_worker::stages::model::EventTime;

static SETTINGS: LazyLock<Settings> = LazyLock::new(|| {
    let text = format!(
        "[listrak]\nclient_id = \"c\"\nclient_secret = \"s\"\n{}",
        listrak_worker::tools::sample::MAPPINGS_TOML
    );
    Settings::from_toml(&text, |_| None).expect("the sample configuration loads")
});

fuzz_target!(|body: &[u8]| {
    if let Ok(inbound) = decode(body, EventTime(1_700_000_000_000_000)) {
        let _ = plan(&inbound, &SETTINGS.mappings, &());
    }
});
