//! Log setup: `tracing` with a human format by default, or one JSON object per
//! line (`log.format: json`).

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, Settings};

/// Installs the global subscriber, writing to stderr. Call once, early.
pub fn init(settings: &Settings) {
    let filter = settings
        .log_directives
        .iter()
        .cloned()
        .fold(EnvFilter::default(), EnvFilter::add_directive);
    let config = &settings.config.log;
    // Colour only for a person at a terminal: in a file or a pipe the
    // escape codes are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(err) = result {
        eprintln!("pushgate: logging already set up: {err}");
    }
}
