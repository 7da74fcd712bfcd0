//! The worker's retry and dead-letter headers, as a producer or a replica may set them.
#![no_main]

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;
use listrak_worker::edges::broker::{self, RetryHeaders};

fn value(kind: u8, bytes: &[u8]) -> AMQPValue {
    let mut eight = [0u8; 8];
    let n = bytes.len().min(8);
    eight[..n].copy_from_slice(&bytes[..n]);
    match kind % 4 {
        0 => AMQPValue::Timestamp(u64::from_le_bytes(eight)),
        1 => AMQPValue::LongLongInt(i64::from_le_bytes(eight)),
        2 => AMQPValue::LongString(LongString::from(bytes.to_vec())),
        _ => ShortString::try_new(String::from_utf8_lossy(bytes).into_owned())
            .map_or(AMQPValue::Boolean(false), AMQPValue::ShortString),
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let half = 2 + (input.len() - 2) / 2;
    let mut table = FieldTable::default();
    table.insert(broker::ATTEMPTS.into(), value(input[0], &input[2..half]));
    table.insert(
        broker::FIRST_FAILED_AT.into(),
        value(input[1], &input[half..]),
    );
    let _ = RetryHeaders::read(&BasicProperties::default().with_headers(table));
});
