//! Which image of a multi-platform index fits this host, in the OCI
//! platform vocabulary (Go's `GOOS`/`GOARCH` names, e.g. `linux`/`amd64`).

use oci_client::manifest::ImageIndexEntry;
use serde::{Deserialize, Serialize};

/// An OCI platform: what an image's binaries run on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// CPU architecture in Go's naming (`amd64`, `arm64`, `arm`, `386`, ...).
    pub architecture: String,
    /// CPU variant (`v8` for arm64, `v7` for arm), when it matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// How well an image built for `os`/`architecture`/`variant` runs here:
    /// `None` if it does not, higher is better (an exact variant beats none).
    fn score(&self, os: &str, architecture: &str, variant: Option<&str>) -> Option<u8> {
        if os != self.os || architecture != self.architecture {
            return None;
        }
        match (variant, self.variant.as_deref()) {
            (None, _) => Some(1),
            (Some(v), Some(mine)) if v == mine => Some(2),
            // arm64 images are v8 whether or not they say so.
            (Some("v8"), None) if architecture == "arm64" => Some(2),
            _ => None,
        }
    }
}

/// The platform of this host (always `linux`; the architecture mapped from
/// Rust's target name to Go's).
pub fn host() -> Platform {
    let (architecture, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "x86" => ("386", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
        "loongarch64" => ("loong64", None),
        other => (other, None),
    };
    Platform {
        os: "linux".to_string(),
        architecture: architecture.to_string(),
        variant: variant.map(str::to_string),
    }
}

/// The index of the entry of an image index that best fits the host, or
/// `None` if none does. An index whose only entry names no platform is taken
/// to be for the host (some tools write single-image indexes that way);
/// entries for other platforms and attestation entries (`unknown/unknown`)
/// never match.
pub fn choose(index_entries: &[ImageIndexEntry]) -> Option<usize> {
    let platforms: Vec<Option<Platform>> = index_entries
        .iter()
        .map(|e| {
            e.platform.as_ref().map(|p| Platform {
                os: p.os.clone(),
                architecture: p.architecture.clone(),
                variant: p.variant.clone(),
            })
        })
        .collect();
    choose_for(&host(), &platforms)
}

/// [`choose`] for an explicit host and plain platform list.
pub fn choose_for(host: &Platform, platforms: &[Option<Platform>]) -> Option<usize> {
    if let [None] = platforms {
        return Some(0);
    }
    platforms
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let p = p.as_ref()?;
            Some((host.score(&p.os, &p.architecture, p.variant.as_deref())?, i))
        })
        // Best score; among equals, the first entry.
        .max_by_key(|&(score, i)| (score, std::cmp::Reverse(i)))
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(arch: &str, variant: Option<&str>) -> Option<Platform> {
        Some(Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        })
    }

    #[test]
    fn picks_the_host_architecture() {
        let amd64 = p("amd64", None).unwrap();
        let arm64 = p("arm64", Some("v8")).unwrap();
        let entries = [p("arm64", Some("v8")), p("amd64", None), p("unknown", None)];
        assert_eq!(choose_for(&amd64, &entries), Some(1));
        assert_eq!(choose_for(&arm64, &entries), Some(0));
        assert_eq!(choose_for(&arm64, &[p("arm64", None)]), Some(0));
        assert_eq!(
            choose_for(&amd64, &[p("arm64", None), p("arm", Some("v7"))]),
            None
        );
        assert_eq!(choose_for(&amd64, &[None]), Some(0));
        let arm7 = p("arm", Some("v7")).unwrap();
        assert_eq!(
            choose_for(&arm7, &[p("arm", Some("v6")), p("arm", Some("v7"))]),
            Some(1)
        );
        assert_eq!(host().os, "linux");
    }
}
