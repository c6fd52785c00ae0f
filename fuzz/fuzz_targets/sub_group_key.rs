//! Sub-group keys from arbitrary dimension values: always one path component made of
//! safe characters, and different values never share a key.
#![no_main]

use ccat_workflow_manager::filter::{Dimension, sub_group_key};
use ccat_workflow_manager::workflow::layout::path_component;
use libfuzzer_sys::fuzz_target;

/// Values for the dimensions, split from the input at 0xFF bytes (lossily decoded, as
/// the database would hand them over as text).
fn values(data: &[u8]) -> Vec<(Dimension, String)> {
    data.split(|b| *b == 0xFF)
        .zip(Dimension::ALL.iter().cycle())
        .map(|(bytes, d)| (*d, String::from_utf8_lossy(bytes).into_owned()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (left, right) = data.split_at(data.len() / 2);
    let (a, b) = (values(left), values(right));
    let (ka, kb) = (sub_group_key(&a), sub_group_key(&b));
    for key in [&ka, &kb] {
        assert!(!key.is_empty());
        assert!(key.len() <= 200, "{} bytes", key.len());
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-~=+".contains(&b)),
            "{key:?}"
        );
        let component = path_component(key);
        assert!(!component.contains('/') && component != "." && component != "..");
    }
    if a != b {
        assert_ne!(ka, kb, "{a:?} and {b:?} share a key");
    }
});
