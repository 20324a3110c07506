//! The command line: parsed into settings before anything runs.

use std::ffi::OsString;
use std::path::PathBuf;

pub const USAGE: &str = "\
kontain: a container registry that generates images when they are pulled

USAGE:
    kontain [--config <file>] [--log-format text|json]

OPTIONS:
    -c, --config <file>   configuration (default: ./kontain.toml if present,
                          else the built-in default)
    --log-format <format> `text` (default) or `json`: one JSON object per
                          line, with the fields Google Cloud Logging reads
    -h, --help            print this help
    -V, --version         print the version

ENVIRONMENT:
    KONTAIN_LISTEN        address:port to listen on (replaces [server] listen)
    PORT                  port to listen on (replaces the configured port)
    RUST_LOG              log filter, e.g. kontain=debug (default: info)
    KONTAIN_LOG_FORMAT    as --log-format (the option wins)
";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = ArgsError;

    fn from_str(s: &str) -> Result<Self, ArgsError> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(ArgsError::LogFormat(other.to_owned())),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Serve {
        config: Option<PathBuf>,
        /// `None`: as `KONTAIN_LOG_FORMAT` says, else text.
        log_format: Option<LogFormat>,
    },
    Help,
    Version,
}

/// The log format: the option's, else `KONTAIN_LOG_FORMAT`'s (unset or
/// empty: text).
pub fn log_format(option: Option<LogFormat>, env: Option<&str>) -> Result<LogFormat, ArgsError> {
    match (option, env.map(str::trim).filter(|v| !v.is_empty())) {
        (Some(f), _) => Ok(f),
        (None, Some(v)) => v.parse().map_err(|_| ArgsError::LogFormatEnv(v.to_owned())),
        (None, None) => Ok(LogFormat::Text),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("unknown log format {0:?}: use text or json")]
    LogFormat(String),
    #[error("KONTAIN_LOG_FORMAT={0:?} is not a log format: use text or json")]
    LogFormatEnv(String),
    #[error("unexpected argument {0:?}; see kontain --help")]
    Unexpected(String),
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, ArgsError> {
    let mut args = args.into_iter().skip(1);
    let (mut config, mut log_format) = (None, None);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(Command::Help),
            Some("-V" | "--version") => return Ok(Command::Version),
            Some("-c" | "--config") => {
                let value = args.next().ok_or(ArgsError::MissingValue("--config"))?;
                config = Some(PathBuf::from(value));
            }
            Some(s) if s.starts_with("--config=") => {
                config = Some(PathBuf::from(&s["--config=".len()..]));
            }
            Some("--log-format") => {
                let value = args.next().ok_or(ArgsError::MissingValue("--log-format"))?;
                log_format = Some(value.to_string_lossy().parse()?);
            }
            Some(s) if s.starts_with("--log-format=") => {
                log_format = Some(s["--log-format=".len()..].parse()?);
            }
            _ => return Err(ArgsError::Unexpected(arg.to_string_lossy().into_owned())),
        }
    }
    Ok(Command::Serve { config, log_format })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, ArgsError> {
        parse(
            std::iter::once("kontain")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn parses_config_log_format_help_and_version() {
        let serve = |config: Option<&str>, log_format| {
            Ok(Command::Serve {
                config: config.map(PathBuf::from),
                log_format,
            })
        };
        assert_eq!(p(&[]), serve(None, None));
        assert_eq!(p(&["--config", "a.toml"]), serve(Some("a.toml"), None));
        assert_eq!(p(&["--config=b.toml"]), serve(Some("b.toml"), None));
        assert_eq!(
            p(&["--log-format", "json", "-c", "c.toml"]),
            serve(Some("c.toml"), Some(LogFormat::Json))
        );
        assert_eq!(
            p(&["--log-format=text"]),
            serve(None, Some(LogFormat::Text))
        );
        assert_eq!(
            p(&["--log-format=xml"]),
            Err(ArgsError::LogFormat("xml".into()))
        );
        assert_eq!(p(&["-h"]), Ok(Command::Help));
        assert_eq!(p(&["--config"]), Err(ArgsError::MissingValue("--config")));
        assert!(matches!(p(&["serve"]), Err(ArgsError::Unexpected(_))));
    }

    #[test]
    fn the_option_wins_over_the_environment() {
        let (json, text) = (Some(LogFormat::Json), Some(LogFormat::Text));
        assert_eq!(log_format(json, Some("text")), Ok(LogFormat::Json));
        assert_eq!(log_format(text, Some("json")), Ok(LogFormat::Text));
        assert_eq!(log_format(None, Some("json")), Ok(LogFormat::Json));
        assert_eq!(log_format(None, Some(" ")), Ok(LogFormat::Text));
        assert_eq!(log_format(None, None), Ok(LogFormat::Text));
        assert_eq!(
            log_format(None, Some("yaml")),
            Err(ArgsError::LogFormatEnv("yaml".into()))
        );
    }
}
