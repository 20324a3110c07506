//! The command line: parsed into settings before anything runs.

use std::ffi::OsString;
use std::path::PathBuf;

pub const USAGE: &str = "\
kontain: a container registry that generates images when they are pulled

USAGE:
    kontain [--config <file>]

OPTIONS:
    -c, --config <file>   configuration (default: ./kontain.toml if present,
                          else the built-in default)
    -h, --help            print this help
    -V, --version         print the version

ENVIRONMENT:
    KONTAIN_LISTEN        address:port to listen on (replaces [server] listen)
    PORT                  port to listen on (replaces the configured port)
    RUST_LOG              log filter, e.g. kontain=debug (default: info)
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Serve { config: Option<PathBuf> },
    Help,
    Version,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("--config needs a file name")]
    MissingValue,
    #[error("unexpected argument {0:?}; see kontain --help")]
    Unexpected(String),
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, ArgsError> {
    let mut args = args.into_iter().skip(1);
    let mut config = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(Command::Help),
            Some("-V" | "--version") => return Ok(Command::Version),
            Some("-c" | "--config") => {
                config = Some(PathBuf::from(args.next().ok_or(ArgsError::MissingValue)?));
            }
            Some(s) if s.starts_with("--config=") => {
                config = Some(PathBuf::from(&s["--config=".len()..]));
            }
            _ => return Err(ArgsError::Unexpected(arg.to_string_lossy().into_owned())),
        }
    }
    Ok(Command::Serve { config })
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
    fn parses_config_help_and_version() {
        assert_eq!(p(&[]), Ok(Command::Serve { config: None }));
        assert_eq!(
            p(&["--config", "a.toml"]),
            Ok(Command::Serve {
                config: Some("a.toml".into())
            })
        );
        assert_eq!(
            p(&["--config=b.toml"]),
            Ok(Command::Serve {
                config: Some("b.toml".into())
            })
        );
        assert_eq!(p(&["-h"]), Ok(Command::Help));
        assert_eq!(p(&["--config"]), Err(ArgsError::MissingValue));
        assert!(matches!(p(&["serve"]), Err(ArgsError::Unexpected(_))));
    }
}
