//! The fingerprint of a (step, sub-group): what decides whether it was processed with the
//! current data, software and configuration (SPEC §5).

use std::fmt::Write as _;

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
///
/// One per step: its sub-groups' fingerprints differ only in their inputs, so the
/// configuration and software are hashed once, and each sub-group's inputs are streamed
/// into a copy of that state (a restart computes one per sub-group of the archive).
///
/// The bytes hashed are exactly the compact JSON text of
/// `{"config": …, "inputs": ["rdp:1", "dp:2", …], "software": {…}, "v": 1}` with sorted
/// keys, as every earlier version wrote them: fingerprints in the database stay valid.
#[derive(Clone)]
pub struct Fingerprinter {
    /// After `{"config":<config>,"inputs":[`.
    prefix: Sha256,
    /// `],"software":{…},"v":1}`.
    suffix: Vec<u8>,
}

impl Fingerprinter {
    pub fn new(software: &SoftwareRef<'_>, config: &Value) -> Self {
        let mut prefix = Sha256::new();
        prefix.update(b"{\"config\":");
        prefix.update(config.to_string().as_bytes());
        prefix.update(b",\"inputs\":[");
        let software = json!({
            "version_id": software.version_id,
            "version": software.version,
            "image_ref": software.image_ref,
            "image_digest": software.image_digest,
        });
        let suffix = format!("],\"software\":{software},\"v\":1}}").into_bytes();
        Fingerprinter { prefix, suffix }
    }

    /// The fingerprint of a sub-group with these inputs (in any order, repeats ignored).
    pub fn of(&self, inputs: &[InputRef]) -> String {
        let mut sorted = inputs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut hasher = self.prefix.clone();
        let mut item = String::with_capacity(32);
        for (i, input) in sorted.iter().enumerate() {
            item.clear();
            if i > 0 {
                item.push(',');
            }
            // Ids and fixed prefixes: nothing JSON would escape.
            let _ = match input {
                InputRef::RawDataPackage(id) => write!(item, "\"rdp:{id}\""),
                InputRef::DataProduct(id) => write!(item, "\"dp:{id}\""),
            };
            hasher.update(item.as_bytes());
        }
        hasher.update(&self.suffix);
        hex::encode(hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(inputs: &[InputRef], software: &SoftwareRef<'_>, config: &Value) -> String {
        Fingerprinter::new(software, config).of(inputs)
    }

    const SW: SoftwareRef<'static> = SoftwareRef {
        version_id: 1,
        version: "1.0.0",
        image_ref: "img:1",
        image_digest: None,
    };

    /// What every earlier version hashed: the whole document built as a JSON value.
    fn reference(inputs: &[InputRef], software: &SoftwareRef<'_>, config: &Value) -> String {
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
        let digest = Sha256::digest(document.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_streamed_fingerprint_is_the_one_stored_runs_carry() {
        let configs = [
            json!({}),
            json!(null),
            json!({"z": [1, 2.5, "é\"\\\n"], "a": {"y": true, "x": null}, "m": "hot_cold"}),
        ];
        let software = [
            SW,
            SoftwareRef {
                version_id: -3,
                version: "2.0.0-rc.1+\"quoted\"",
                image_ref: "registry/x:tag",
                image_digest: Some("sha256:ab"),
            },
        ];
        let inputs = [
            vec![],
            vec![InputRef::RawDataPackage(7)],
            vec![
                InputRef::DataProduct(3),
                InputRef::RawDataPackage(-1),
                InputRef::DataProduct(3),
                InputRef::RawDataPackage(10_000_000_000),
            ],
        ];
        for config in &configs {
            for sw in &software {
                let f = Fingerprinter::new(sw, config);
                for i in &inputs {
                    assert_eq!(f.of(i), reference(i, sw, config), "{config} {sw:?} {i:?}");
                }
            }
        }
    }

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
