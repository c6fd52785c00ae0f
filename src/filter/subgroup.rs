//! Sub-groups: the split of a grouping's packages by the `group_by` dimensions, and their
//! filesystem-safe keys.

use sha2::{Digest, Sha256};

use super::Dimension;

/// Keys longer than this are cut and end in a hash of the whole, so they fit in one
/// path component (255 bytes on common filesystems) with room to spare.
const MAX_KEY_LEN: usize = 120;

/// One sub-group: a value per dimension, in `group_by` order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubGroup {
    pub values: Vec<(Dimension, String)>,
}

impl SubGroup {
    pub fn key(&self) -> String {
        sub_group_key(&self.values)
    }

    /// The dimension values as a JSON object, as stored on a run.
    pub fn to_json(&self) -> serde_json::Value {
        self.values
            .iter()
            .map(|(d, v)| (d.name().to_owned(), serde_json::Value::String(v.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// The key of a sub-group: `all` for `group_by = []`, else `dim=value` parts joined by
/// `+`, e.g. `source=NGC253+night=2026-01-31`. Deterministic and one-to-one; values are
/// escaped so that a key never holds `/`, `.`, `..`, white space or control characters:
/// every byte outside `[A-Za-z0-9_-]` becomes `~XX`.
pub fn sub_group_key(values: &[(Dimension, String)]) -> String {
    if values.is_empty() {
        return "all".to_owned();
    }
    let key = values
        .iter()
        .map(|(dim, value)| format!("{}={}", dim.name(), escape(value)))
        .collect::<Vec<_>>()
        .join("+");
    if key.len() <= MAX_KEY_LEN {
        return key;
    }
    let digest = Sha256::digest(key.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    // Cut on a char boundary that does not split an escape.
    let mut cut = MAX_KEY_LEN - hash.len() - 2;
    while !key.is_char_boundary(cut)
        || key[..cut].ends_with('~')
        || key[..cut.saturating_sub(1)].ends_with('~')
    {
        cut -= 1;
    }
    format!("{}~~{hash}", &key[..cut])
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("~{byte:02X}"));
        }
    }
    if out.is_empty() {
        // An empty value (e.g. an obs unit without a line) still needs a visible mark.
        out.push('~');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(parts: &[(Dimension, &str)]) -> String {
        sub_group_key(
            &parts
                .iter()
                .map(|(d, v)| (*d, (*v).to_owned()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn keys_are_readable_and_deterministic() {
        assert_eq!(key(&[]), "all");
        assert_eq!(
            key(&[
                (Dimension::Source, "NGC253"),
                (Dimension::Night, "2026-01-31")
            ]),
            "source=NGC253+night=2026-01-31"
        );
        assert_eq!(key(&[(Dimension::Source, "NGC 253")]), "source=NGC~20253");
        assert_eq!(key(&[(Dimension::Line, "")]), "line=~");
    }

    #[test]
    fn hostile_values_cannot_escape_a_directory() {
        for value in [
            "../../etc",
            "/abs",
            "a/b",
            "..",
            ".",
            "x\ny",
            "tab\there",
            "nul\0",
            "~7E",
            "é",
        ] {
            let k = key(&[(Dimension::Source, value)]);
            assert!(
                !k.contains('/') && !k.contains('.') && !k.chars().any(char::is_control),
                "{k}"
            );
            assert!(k.is_ascii(), "{k}");
        }
        // Escaping is one-to-one: '~' itself is escaped.
        assert_ne!(
            key(&[(Dimension::Source, "~7E")]),
            key(&[(Dimension::Source, "~")])
        );
    }

    #[test]
    fn long_keys_are_cut_with_a_hash() {
        let long = "x".repeat(300);
        let k1 = key(&[(Dimension::Source, &long)]);
        let k2 = key(&[(Dimension::Source, &format!("{long}y"))]);
        assert!(k1.len() <= MAX_KEY_LEN, "{}", k1.len());
        assert_ne!(k1, k2);
        let spaces = " ".repeat(300);
        assert!(key(&[(Dimension::Source, &spaces)]).len() <= MAX_KEY_LEN);
    }
}
