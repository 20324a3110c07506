//! `wait`: an image that appears only after a delay, as kontain.me's `wait`.
//!
//! `wait/<name>:<duration>` (`30s`, `5m`, `1h`, at most 24h): the first pull
//! starts the clock; until the duration has passed every pull gets 404 with a
//! "waiting" message — the asynchronous pattern a Kubernetes image pull
//! retries through — and after it, a small image. The clock start lives in the
//! generator's cache, so it survives restarts and is shared by every request.

use std::time::{SystemTime, UNIX_EPOCH};

use kontain_sdk::{
    Config, Error, Generator, History, Manifest, ManifestFormat, Request, cache, images, random,
};

const MAX_WAIT_SECS: u64 = 24 * 3600;

struct Wait;

impl Generator for Wait {
    fn resolve(request: Request) -> Result<Manifest, Error> {
        if request.is_digest() {
            return Err(Error::NotFound(format!(
                "{} is not stored",
                request.reference
            )));
        }
        let wait = parse_duration(&request.reference)?;
        let name = if request.repository.is_empty() {
            "default"
        } else {
            &request.repository
        };
        let key = format!("{name}:{}", request.reference);
        let now = now();
        let started = match cache::get(&key).and_then(|v| v.parse::<u64>().ok()) {
            Some(started) => started,
            None => {
                cache::set(&key, &now.to_string())?;
                now
            }
        };
        let ready_at = started + wait;
        if now < ready_at {
            return Err(Error::NotFound(format!(
                "waiting: wait/{name}:{} is ready in {}s",
                request.reference,
                ready_at - now
            )));
        }
        let layers = random::layers(1, 1024)?;
        let mut config = Config::for_platform("linux", "amd64");
        config.history = vec![History {
            created_by: format!("kontain wait: ready after {}", request.reference),
            comment: String::new(),
            empty_layer: false,
        }];
        let borrowed: Vec<&images::Layer> = layers.iter().collect();
        images::assemble(ManifestFormat::Docker, &config, &borrowed, &[])
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `30s`, `5m`, `2h`, or plain seconds.
fn parse_duration(tag: &str) -> Result<u64, Error> {
    let bad = || {
        Error::InvalidReference(format!(
            "wait:{tag}: use a duration such as 30s, 5m or 1h (at most 24h)"
        ))
    };
    let (digits, unit) = tag.split_at(tag.find(|c: char| !c.is_ascii_digit()).unwrap_or(tag.len()));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if secs > MAX_WAIT_SECS {
        return Err(bad());
    }
    Ok(secs)
}

kontain_sdk::export_generator!(Wait);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_up_to_a_day() {
        for (tag, want) in [
            ("30s", Some(30)),
            ("5m", Some(300)),
            ("2h", Some(7200)),
            ("0", Some(0)),
            ("25h", None),
            ("x", None),
            ("5d", None),
        ] {
            assert_eq!(parse_duration(tag).ok(), want, "{tag}");
        }
    }
}
