//! A request body at `ingest`'s door: split into events (or refused as not JSON), and every
//! event's body is exactly a part of the request, ready to publish as it came.
#![no_main]

use libfuzzer_sys::fuzz_target;
use listrak_worker::stages::ingest::{signature, signature_matches, split_events};

fuzz_target!(|body: &[u8]| {
    if let Ok(events) = split_events(body) {
        let text = std::str::from_utf8(body).expect("accepted bodies are UTF-8");
        for event in &events {
            assert!(text.contains(event.body), "an event is a part of the body");
            assert!(serde_json::from_str::<serde_json::Value>(event.body).is_ok());
        }
    }
    assert!(signature_matches(b"secret", body, &signature(b"secret", body)));
});
