//! A configuration file: loaded, or refused naming a key; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use listrak_worker::config::Settings;

fuzz_target!(|text: &[u8]| {
    if let Ok(text) = std::str::from_utf8(text) {
        let _ = Settings::from_toml(text, |_| None);
    }
});
