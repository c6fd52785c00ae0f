//! Pipelines-as-code files: parsed and validated or refused with an error, never a panic;
//! what parses exports to a file that parses back to the same definitions.
#![no_main]

use ccat_workflow_manager::definitions::{Definitions, Known};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(defs) = Definitions::parse("fuzz.toml", text) else {
        return;
    };
    let _ = defs.validate("fuzz.toml", &Known::default());
    let exported = defs.to_toml();
    let again = Definitions::parse("export.toml", &exported)
        .unwrap_or_else(|e| panic!("the export does not parse: {e}\n{exported}"));
    assert_eq!(again, defs, "{exported}");
});
