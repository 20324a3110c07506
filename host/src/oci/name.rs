//! Repository names, tags and references, by the distribution spec grammar.

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A repository name as the distribution spec's grammar allows:
/// path components of `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`,
/// at most 255 characters.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RepositoryName(String);

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

/// What follows `/manifests/`: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "repository name {0:?} is not valid: use lowercase letters, digits and separators (. _ __ -) between path components"
    )]
    InvalidRepository(String),
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    RepositoryTooLong,
    #[error("tag {0:?} is not valid: up to 128 of A-Z a-z 0-9 _ . -, not starting with . or -")]
    InvalidTag(String),
    #[error(transparent)]
    InvalidDigest(#[from] DigestError),
}

impl RepositoryName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path components, e.g. `["mirror", "library", "busybox"]`.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Splits off the first path component: `mirror/library/busybox` gives
    /// `("mirror", Some("library/busybox"))`.
    pub fn split_first(&self) -> (&str, Option<&str>) {
        match self.0.split_once('/') {
            Some((first, rest)) => (first, Some(rest)),
            None => (&self.0, None),
        }
    }
}

fn is_component(c: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__", or one or more "-".
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for RepositoryName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::RepositoryTooLong);
        }
        if s.is_empty() || !s.split('/').all(is_component) {
            return Err(NameError::InvalidRepository(s.to_owned()));
        }
        Ok(RepositoryName(s.to_owned()))
    }
}

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_TAG_LEN
            && word(bytes[0])
            && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(NameError::InvalidTag(s.to_owned()))
        }
    }
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Tags cannot contain ':', digests always do.
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    )*};
}
display_as_str!(RepositoryName, Tag);

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_the_spec_allows() {
        for ok in [
            "random",
            "mirror/library/busybox",
            "a",
            "a.b_c__d---e/f0",
            "ko/github.com/google/ko",
            "x-y",
        ] {
            assert!(ok.parse::<RepositoryName>().is_ok(), "rejected {ok:?}");
        }
    }

    #[test]
    fn rejects_names_the_spec_forbids() {
        for bad in [
            "", "Random", "a//b", "/a", "a/", "a..b", "a___b", "-a", "a-", "a/../b", "..", "a b",
            "a:b", "a%2fb",
        ] {
            assert!(bad.parse::<RepositoryName>().is_err(), "accepted {bad:?}");
        }
        let long = "a".repeat(256);
        assert_eq!(
            long.parse::<RepositoryName>(),
            Err(NameError::RepositoryTooLong)
        );
    }

    #[test]
    fn accepts_tags_the_spec_allows_and_rejects_others() {
        for ok in ["latest", "4x100", "_x", "v1.0.0-rc.1", &"a".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "rejected {ok:?}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129), "ü"] {
            assert!(bad.parse::<Tag>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn references_are_digests_when_they_contain_a_colon() {
        assert!(matches!("latest".parse(), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(d.parse(), Ok(Reference::Digest(_))));
        assert!("sha256:totallywrong".parse::<Reference>().is_err());
    }

    #[test]
    fn splits_off_the_first_component() {
        let n: RepositoryName = "mirror/library/busybox".parse().unwrap();
        assert_eq!(n.split_first(), ("mirror", Some("library/busybox")));
        let n: RepositoryName = "random".parse().unwrap();
        assert_eq!(n.split_first(), ("random", None));
    }
}
