//! Which endpoint of the distribution API a path names. Names may contain
//! `/`, so the path is split on the *last* `/manifests/` or `/blobs/`; the
//! parts stay raw strings here and are validated by the handlers, which know
//! which error each invalid part deserves.

use super::response::Subject;

#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// Not under `/v2/`.
    Outside,
    /// `/v2/`
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/blobs/uploads/...`: the push side.
    Upload,
    /// `/v2/<name>/tags/list`
    TagsList { name: &'a str },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: &'a str, digest: &'a str },
    /// `/v2/_catalog`
    Catalog,
    /// Anything else under `/v2/`.
    Unknown,
}

impl Endpoint<'_> {
    /// What a failure at this endpoint failed to produce.
    pub fn subject(&self) -> Subject {
        match self {
            Endpoint::Manifest { .. } | Endpoint::Referrers { .. } => Subject::Manifest,
            Endpoint::Blob { .. } => Subject::Blob,
            Endpoint::TagsList { .. } => Subject::Repository,
            _ => Subject::Other,
        }
    }
}

pub fn parse(path: &str) -> Endpoint<'_> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Endpoint::Outside;
    };
    let rest = match rest {
        "" | "/" => return Endpoint::Base,
        r => match r.strip_prefix('/') {
            Some(r) => r,
            None => return Endpoint::Outside,
        },
    };
    if rest == "_catalog" {
        return Endpoint::Catalog;
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return match name.is_empty() {
            true => Endpoint::Unknown,
            false => Endpoint::TagsList { name },
        };
    }
    if let Some(at) = rest.rfind("/referrers/") {
        let (name, digest) = (&rest[..at], &rest[at + "/referrers/".len()..]);
        // Otherwise a name with a `referrers` component, e.g. a manifest of
        // `a/referrers/b`.
        if !name.is_empty() && !digest.is_empty() && !digest.contains('/') {
            return Endpoint::Referrers { name, digest };
        }
    }
    if let Some(at) = rest.rfind("/manifests/") {
        let (name, reference) = (&rest[..at], &rest[at + "/manifests/".len()..]);
        if !name.is_empty() && !reference.is_empty() && !reference.contains('/') {
            return Endpoint::Manifest { name, reference };
        }
        return Endpoint::Unknown;
    }
    if let Some(at) = rest.rfind("/blobs/") {
        let (name, digest) = (&rest[..at], &rest[at + "/blobs/".len()..]);
        if digest == "uploads" || digest.starts_with("uploads/") {
            return Endpoint::Upload;
        }
        if !name.is_empty() && !digest.is_empty() && !digest.contains('/') {
            return Endpoint::Blob { name, digest };
        }
        return Endpoint::Unknown;
    }
    if rest.ends_with("/blobs/uploads") || rest.contains("/blobs/uploads/") {
        return Endpoint::Upload;
    }
    Endpoint::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_the_last_manifests_or_blobs_segment() {
        for (path, want) in [
            ("/", Endpoint::Outside),
            ("/v2", Endpoint::Base),
            ("/v2/", Endpoint::Base),
            ("/v2x", Endpoint::Outside),
            (
                "/v2/random/manifests/4x100",
                Endpoint::Manifest {
                    name: "random",
                    reference: "4x100",
                },
            ),
            (
                "/v2/mirror/manifests/x/manifests/latest",
                Endpoint::Manifest {
                    name: "mirror/manifests/x",
                    reference: "latest",
                },
            ),
            (
                "/v2/a/b/blobs/sha256:00",
                Endpoint::Blob {
                    name: "a/b",
                    digest: "sha256:00",
                },
            ),
            ("/v2/x/blobs/uploads/", Endpoint::Upload),
            ("/v2/a/b/tags/list", Endpoint::TagsList { name: "a/b" }),
            ("/v2/tags/list", Endpoint::Unknown),
            (
                "/v2/ko/x/referrers/sha256:00",
                Endpoint::Referrers {
                    name: "ko/x",
                    digest: "sha256:00",
                },
            ),
            (
                "/v2/a/referrers/b/manifests/v1",
                Endpoint::Manifest {
                    name: "a/referrers/b",
                    reference: "v1",
                },
            ),
            ("/v2/x/blobs/uploads/1234", Endpoint::Upload),
            ("/v2/x/blobs/uploads", Endpoint::Upload),
            ("/v2/x/tags/list", Endpoint::TagsList { name: "x" }),
            ("/v2/_catalog", Endpoint::Catalog),
            ("/v2/x/manifests/", Endpoint::Unknown),
            ("/v2/manifests/latest", Endpoint::Unknown),
            ("/v2/x/blobs/", Endpoint::Unknown),
            ("/v2/x/other", Endpoint::Unknown),
        ] {
            assert_eq!(parse(path), want, "{path}");
        }
    }
}
