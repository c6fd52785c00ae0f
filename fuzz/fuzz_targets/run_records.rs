//! What the managers read back from a run directory that a job could have written: the
//! local backend's exit record and quality-metrics sidecars. Refused with a reason or
//! read, never a panic; what is read maps to a run state.
#![no_main]

use ccat_workflow_manager::backend::local::parse_exit_record;
use ccat_workflow_manager::results::collect::parse_metrics;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = parse_exit_record(&String::from_utf8_lossy(data)) {
        let _ = record.state();
    }
    if let Ok(metrics) = parse_metrics(data) {
        assert!(metrics.is_object());
    }
});
