//! Image references as people write them: `name[:tag][@digest]`.
//!
//! One copy for the host and the plugin SDK (`plugins/sdk` includes this
//! file by path), so that both split a reference the same way. Pure: no
//! dependency on anything else, here or in the SDK.

/// `name[:tag][@digest]` split into the name and the tag or digest (`latest`
/// when neither is given). A `:` counts only in the last path component, so
/// a registry port (`host:5000/app`) stays part of the name.
pub fn split_reference(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    let last = image.rfind('/').map_or(0, |i| i + 1);
    match image[last..].find(':') {
        Some(i) => (&image[..last + i], &image[last + i + 1..]),
        None => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::split_reference;

    #[test]
    fn splits_names_from_tags_and_digests() {
        for (image, want) in [
            ("busybox", ("busybox", "latest")),
            ("busybox:1.36", ("busybox", "1.36")),
            ("ghcr.io/org/app:v1", ("ghcr.io/org/app", "v1")),
            ("host:5000/app", ("host:5000/app", "latest")),
            ("host:5000/app:v2", ("host:5000/app", "v2")),
            ("app@sha256:abc", ("app", "sha256:abc")),
            ("app:v1@sha256:abc", ("app:v1", "sha256:abc")),
            ("a:b:c", ("a", "b:c")),
        ] {
            assert_eq!(split_reference(image), want, "{image}");
        }
    }
}
