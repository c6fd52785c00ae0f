//! `version_policy`: which reduction-software version a step runs (SPEC §5).

use semver::Version;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The pinned version, deprecated or not.
    Exact,
    /// The newest non-deprecated release with the pinned version's major number.
    Compatible,
    /// The newest non-deprecated release.
    Latest,
}

impl VersionPolicy {
    /// From the upper-case name stored in the database.
    pub fn from_db(name: &str) -> Option<Self> {
        match name {
            "EXACT" => Some(VersionPolicy::Exact),
            "COMPATIBLE" => Some(VersionPolicy::Compatible),
            "LATEST" => Some(VersionPolicy::Latest),
            _ => None,
        }
    }
}

/// What the policy needs to know of one version of the step's software.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: i64,
    pub version: String,
    pub deprecated: bool,
}

/// Picks the version to run. Versions whose text is not semantic are only ever chosen
/// when pinned under `Exact`; pre-releases are never chosen by `Compatible` or `Latest`.
pub fn resolve(
    policy: VersionPolicy,
    pinned_id: Option<i64>,
    candidates: &[Candidate],
) -> Result<&Candidate, String> {
    let pinned = pinned_id.map(|id| {
        candidates.iter().find(|c| c.id == id).ok_or_else(|| {
            format!("pinned software version {id} does not belong to the step's software")
        })
    });
    let newest = |keep: &dyn Fn(&Version) -> bool| {
        candidates
            .iter()
            .filter(|c| !c.deprecated)
            .filter_map(|c| Version::parse(&c.version).ok().map(|v| (v, c)))
            .filter(|(v, _)| v.pre.is_empty() && keep(v))
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, c)| c)
    };
    match policy {
        VersionPolicy::Exact => {
            pinned.ok_or_else(|| "version_policy exact needs a pinned version".to_owned())?
        }
        VersionPolicy::Compatible => {
            let pinned = pinned
                .ok_or_else(|| "version_policy compatible needs a pinned version".to_owned())??;
            let major = Version::parse(&pinned.version)
                .map_err(|e| {
                    format!(
                        "pinned version {:?} is not a semantic version: {e}",
                        pinned.version
                    )
                })?
                .major;
            newest(&|v| v.major == major)
                .ok_or_else(|| format!("no non-deprecated release with major version {major}"))
        }
        VersionPolicy::Latest => {
            newest(&|_| true).ok_or_else(|| "the software has no non-deprecated release".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: i64, version: &str, deprecated: bool) -> Candidate {
        Candidate {
            id,
            version: version.into(),
            deprecated,
        }
    }

    #[test]
    fn policies_choose_as_specified() {
        let all = [
            c(1, "1.2.0", false),
            c(2, "1.10.1", false),
            c(3, "1.11.0", true),
            c(4, "2.0.0", false),
            c(5, "2.1.0-rc.1", false),
            c(6, "nightly", false),
        ];
        assert_eq!(resolve(VersionPolicy::Exact, Some(3), &all).unwrap().id, 3);
        assert_eq!(resolve(VersionPolicy::Exact, Some(6), &all).unwrap().id, 6);
        assert_eq!(
            resolve(VersionPolicy::Compatible, Some(1), &all)
                .unwrap()
                .id,
            2
        );
        assert_eq!(
            resolve(VersionPolicy::Compatible, Some(4), &all)
                .unwrap()
                .id,
            4
        );
        assert_eq!(resolve(VersionPolicy::Latest, None, &all).unwrap().id, 4);
    }

    #[test]
    fn impossible_choices_are_explained() {
        let all = [c(1, "1.0.0", true)];
        assert!(
            resolve(VersionPolicy::Exact, None, &all)
                .unwrap_err()
                .contains("pinned")
        );
        assert!(
            resolve(VersionPolicy::Exact, Some(9), &all)
                .unwrap_err()
                .contains("does not belong")
        );
        assert!(
            resolve(VersionPolicy::Compatible, Some(1), &all)
                .unwrap_err()
                .contains("major version 1")
        );
        assert!(
            resolve(VersionPolicy::Latest, None, &all)
                .unwrap_err()
                .contains("no non-deprecated")
        );
        let odd = [c(1, "nightly", false)];
        assert!(
            resolve(VersionPolicy::Compatible, Some(1), &odd)
                .unwrap_err()
                .contains("not a semantic")
        );
    }
}
