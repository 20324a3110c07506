//! The `kontain` binary: parse the command line, start logging, load the
//! config and hand it to `kontain::run`.

use anyhow::Context;
use kontain::cli::{self, Command};
use kontain::config::Config;

fn main() -> anyhow::Result<()> {
    let config = match cli::parse(std::env::args_os())? {
        Command::Help => {
            print!("{}", cli::USAGE);
            return Ok(());
        }
        Command::Version => {
            println!("kontain {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Command::Serve { config, log_format } => {
            let env = std::env::var("KONTAIN_LOG_FORMAT").ok();
            kontain::logs::init(cli::log_format(log_format, env.as_deref())?);
            config
        }
    };
    let mut config = Config::load(config.as_deref())?;
    config.apply_env(|k| std::env::var(k).ok())?;
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(kontain::run(config, kontain::shutdown_signal()))
}
