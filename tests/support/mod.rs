//! Helpers shared by integration tests (`mod support;` in a test file). Each test binary
//! uses only some of them.
#![allow(dead_code)]

pub mod fake_graph;

/// A webhook `timestamp` (unix seconds, as text) for a message written now. Servers in tests
/// run on the system clock, and an older timestamp would put the customer outside the
/// 24-hour window.
pub fn now_timestamp() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
        .to_string()
}
