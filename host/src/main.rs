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
        Command::Serve { config } => config,
    };
    tracing_subscriber::fmt()
        // Colours only for people: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .init();
    let mut config = Config::load(config.as_deref())?;
    config.apply_env(|k| std::env::var(k).ok())?;
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(kontain::run(config, kontain::shutdown_signal()))
}
