//! `random`: a fresh image of random layers on every pull, as kontain.me served.
//!
//! Tag grammar: `NxM` is N layers (1..=99) of M random bytes (1..=99,999,999).
//! Any other tag, `latest` included, is one layer of 10,000,000 bytes. A tag that
//! looks like `NxM` but is out of range is refused rather than clamped, so the
//! user learns the limit instead of getting an image they did not ask for.

use kontain_sdk::{
    Config, Error, Generator, History, Manifest, ManifestFormat, Request, images, random,
};

const DEFAULT_LAYERS: u32 = 1;
const DEFAULT_SIZE: u64 = 10_000_000;
const MAX_LAYERS: u32 = 99;
const MAX_SIZE: u64 = 99_999_999;

struct Random;

impl Generator for Random {
    fn resolve(request: Request) -> Result<Manifest, Error> {
        if request.is_digest() {
            // Every random image is stored when it is made; a digest the host
            // does not have was never made (or has expired).
            return Err(Error::NotFound(format!(
                "random image {} is not stored; pull a tag such as random:4x100 for a new image",
                request.reference
            )));
        }
        let (count, size) = parse_tag(&request.reference)?;
        let layers = random::layers(count, size)?;
        let mut config = Config::for_platform("linux", "amd64");
        // Every pull is a new image, so its creation time is now.
        config.created = Some(kontain_sdk::now_rfc3339());
        config.history = (1..=count)
            .map(|n| History {
                created_by: format!("kontain random: {size} random bytes"),
                comment: format!("layer {n} of {count}"),
                empty_layer: false,
            })
            .collect();
        let borrowed: Vec<&images::Layer> = layers.iter().collect();
        images::assemble(ManifestFormat::Docker, &config, &borrowed, &[])
    }

    /// Any `NxM` is a tag; these show the grammar.
    fn tags(_repository: String) -> Result<Vec<String>, Error> {
        Ok(EXAMPLE_TAGS.iter().map(|t| (*t).to_owned()).collect())
    }
}

/// What `tags/list` shows: a few shapes, small to large.
const EXAMPLE_TAGS: [&str; 5] = ["1x10", "4x100", "4x1000000", "10x10000000", "latest"];

/// Parses `NxM`; any tag not of that shape means the default image.
fn parse_tag(tag: &str) -> Result<(u32, u64), Error> {
    let Some((n, m)) = tag.split_once('x') else {
        return Ok((DEFAULT_LAYERS, DEFAULT_SIZE));
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(n) || !all_digits(m) {
        return Ok((DEFAULT_LAYERS, DEFAULT_SIZE));
    }
    let layers = n
        .parse::<u32>()
        .ok()
        .filter(|l| (1..=MAX_LAYERS).contains(l));
    let size = m.parse::<u64>().ok().filter(|s| (1..=MAX_SIZE).contains(s));
    match (layers, size) {
        (Some(layers), Some(size)) => Ok((layers, size)),
        (None, _) => Err(Error::InvalidReference(format!(
            "random:{tag} asks for {n} layers; NxM allows 1 to {MAX_LAYERS} layers"
        ))),
        (_, None) => Err(Error::InvalidReference(format!(
            "random:{tag} asks for {m} bytes per layer; NxM allows 1 to {MAX_SIZE} bytes"
        ))),
    }
}

kontain_sdk::export_generator!(Random);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layers_and_sizes_and_defaults_other_tags() {
        for (tag, want) in [
            ("4x100", Some((4, 100))),
            ("1x1", Some((1, 1))),
            ("99x99999999", Some((99, 99_999_999))),
            ("latest", Some((1, 10_000_000))),
            ("x", Some((1, 10_000_000))),
            ("4xabc", Some((1, 10_000_000))),
            ("100x1", None),
            ("0x10", None),
            ("1x0", None),
            ("1x100000000", None),
            ("1x99999999999999999999999", None),
        ] {
            assert_eq!(parse_tag(tag).ok(), want, "tag {tag}");
        }
    }
}
