//! Waiting on a condition with a deadline: poll, back off from 2 ms to 100 ms, give up with
//! [`HostError::Timeout`]. Never a fixed sleep standing in for a condition.

use std::time::{Duration, Instant};

use super::error::{HostError, Result};

/// Polls `done` until it returns `Some`, an error, or `timeout` passes. On timeout the error
/// names `what` and carries `detail()` (evaluated then, e.g. a helper's standard error).
pub(crate) fn poll<T>(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Result<Option<T>>,
    detail: impl FnOnce() -> String,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = done()? {
            return Ok(v);
        }
        let waited = start.elapsed();
        if waited >= timeout {
            let d = detail();
            return Err(HostError::Timeout {
                what: what.to_string(),
                after: timeout,
                detail: if d.is_empty() { d } else { format!(": {d}") },
            });
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_or_times_out_with_detail() {
        let mut n = 0;
        let v = poll(
            "n reaches 3",
            Duration::from_secs(5),
            || {
                n += 1;
                Ok((n >= 3).then_some(n))
            },
            String::new,
        )
        .unwrap();
        assert_eq!(v, 3);
        let err = poll::<()>(
            "never",
            Duration::from_millis(20),
            || Ok(None),
            || "why".into(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("never: not done after 20ms: why"),
            "{err}"
        );
    }
}
