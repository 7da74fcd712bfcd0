//! A Listrak answer: status, `Retry-After` and body, read and classified.
#![no_main]

use libfuzzer_sys::fuzz_target;
use listrak_worker::stages::classify::{classify, parse_retry_after, ListrakError, Outcome};

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let status = u16::from_le_bytes([input[0], input[1]]);
    let split = (input[2] as usize).min(input.len() - 3);
    let (retry_after, body) = input[3..].split_at(split);
    let outcome = Outcome::Answered {
        status,
        retry_after: std::str::from_utf8(retry_after)
            .ok()
            .and_then(|text| parse_retry_after(text, chrono::Utc::now())),
        error: serde_json::from_slice::<ListrakError>(body).ok(),
    };
    let _ = classify(&outcome, usize::from(input[3]));
});
