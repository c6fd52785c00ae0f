//! The fingerprint of a (step, sub-group): what decides whether it was processed with the
//! current data, software and configuration (SPEC §5).

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// One input of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputRef {
    RawDataPackage(i64),
    DataProduct(i64),
}

/// The software a run would use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoftwareRef<'a> {
    pub version_id: i64,
    pub version: &'a str,
    pub image_ref: &'a str,
    pub image_digest: Option<&'a str>,
}

/// SHA-256 (hex) over the sorted inputs, the software version with its image, and the step
/// configuration. JSON objects are written with sorted keys, so equal configurations hash
/// equally whatever order their keys were stored in.
pub fn fingerprint(inputs: &[InputRef], software: &SoftwareRef<'_>, config: &Value) -> String {
    let mut sorted = inputs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let inputs: Vec<String> = sorted
        .iter()
        .map(|i| match i {
            InputRef::RawDataPackage(id) => format!("rdp:{id}"),
            InputRef::DataProduct(id) => format!("dp:{id}"),
        })
        .collect();
    let document = json!({
        "v": 1,
        "inputs": inputs,
        "software": {
            "version_id": software.version_id,
            "version": software.version,
            "image_ref": software.image_ref,
            "image_digest": software.image_digest,
        },
        "config": config,
    });
    crate::results::collect::hex(&Sha256::digest(document.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SW: SoftwareRef<'static> = SoftwareRef {
        version_id: 1,
        version: "1.0.0",
        image_ref: "img:1",
        image_digest: None,
    };

    #[test]
    fn order_of_inputs_and_config_keys_does_not_matter() {
        let a = fingerprint(
            &[InputRef::RawDataPackage(2), InputRef::RawDataPackage(1)],
            &SW,
            &serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": 1}}"#).unwrap(),
        );
        let b = fingerprint(
            &[InputRef::RawDataPackage(1), InputRef::RawDataPackage(2)],
            &SW,
            &serde_json::from_str(r#"{"a": {"x": 1, "y": 2}, "b": 1}"#).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn data_software_and_config_each_change_it() {
        let base = fingerprint(
            &[InputRef::RawDataPackage(1)],
            &SW,
            &json!({"m": "hot_cold"}),
        );
        let more_data = fingerprint(
            &[InputRef::RawDataPackage(1), InputRef::RawDataPackage(3)],
            &SW,
            &json!({"m": "hot_cold"}),
        );
        let new_sw = fingerprint(
            &[InputRef::RawDataPackage(1)],
            &SoftwareRef {
                image_digest: Some("sha256:ab"),
                ..SW
            },
            &json!({"m": "hot_cold"}),
        );
        let new_cfg = fingerprint(&[InputRef::RawDataPackage(1)], &SW, &json!({"m": "sky"}));
        let product = fingerprint(&[InputRef::DataProduct(1)], &SW, &json!({"m": "hot_cold"}));
        let all = [&base, &more_data, &new_sw, &new_cfg, &product];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
