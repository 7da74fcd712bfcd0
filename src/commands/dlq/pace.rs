//! `--rate`: pacing replays to a number of messages per second.

pub use crate::stages::pace::Pace;

/// Parses `--rate`: `50`, `50/s`, `0.5/s`, `3000/m` or `100/h`, messages per time unit.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, per) = match text.split_once('/') {
        Some((number, unit)) => {
            let per = match unit.trim() {
                "s" | "sec" | "second" => 1.0,
                "m" | "min" | "minute" => 60.0,
                "h" | "hour" => 3600.0,
                other => return Err(format!("{other:?} is not a time unit (s, m or h)")),
            };
            (number.trim(), per)
        }
        None => (text, 1.0),
    };
    match number.parse::<f64>() {
        // At least one an hour: the pause between two messages must fit any clock.
        Ok(n) if n.is_finite() && n / per >= 1.0 / 3600.0 && n / per <= 1e6 => Ok(n / per),
        _ => Err(format!(
            "{text:?} is not a rate from 1/h to 1000000/s; expected messages per second such as 50 \
             or 50/s"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn slots_are_one_interval_apart_from_the_first_send() {
        let start = Instant::now();
        let mut pace = Pace::new(100.0);
        let ms = |n: u64| start + Duration::from_millis(n);
        assert_eq!(pace.slot(start), start);
        // Asked early: wait for the slot. Asked a little late: the schedule does not drift.
        assert_eq!(pace.slot(ms(1)), ms(10));
        assert_eq!(pace.slot(ms(12)), ms(20));
        assert_eq!(pace.slot(ms(20)), ms(30));
    }

    #[test]
    fn a_sender_that_fell_behind_gets_no_burst() {
        let start = Instant::now();
        let mut pace = Pace::new(10.0);
        let ms = |n: u64| start + Duration::from_millis(n);
        pace.slot(start);
        assert_eq!(pace.slot(ms(1000)), ms(1000));
        assert_eq!(pace.slot(ms(1000)), ms(1100));
    }

    #[test]
    fn rates_read_as_operators_write_them() {
        assert_eq!(parse_rate("50"), Ok(50.0));
        assert_eq!(parse_rate("50/s"), Ok(50.0));
        assert_eq!(parse_rate(" 0.5/s "), Ok(0.5));
        assert_eq!(parse_rate("3000/m"), Ok(50.0));
        assert_eq!(parse_rate("7200/h"), Ok(2.0));
        for bad in [
            "0", "-5", "fast", "50/d", "inf", "", "1e-300", "0.5/h", "2000000",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
