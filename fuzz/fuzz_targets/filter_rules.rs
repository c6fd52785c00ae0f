//! Filter rules and `group_by` as they come from the database or a definitions file:
//! any JSON is either accepted or refused with an error, never a panic.
#![no_main]

use ccat_workflow_manager::filter::{parse_group_by, parse_rules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Err(e) = parse_rules(&value) {
        // Errors are for people: they are never empty.
        assert!(!e.to_string().is_empty());
    }
    let _ = parse_group_by(&value);
});
