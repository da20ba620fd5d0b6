//! Log setup: `tracing` with a human format by default, or one JSON object per
//! line (`log.format: json`). `log.level` can change while running
//! ([`set_level`], on reload).

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, Settings};

/// Replaces the installed subscriber's filter; set by [`init`].
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// The filter `log.level`'s directives make.
fn filter(settings: &Settings) -> EnvFilter {
    settings
        .log_directives
        .iter()
        .cloned()
        .fold(EnvFilter::default(), EnvFilter::add_directive)
}

/// Installs the global subscriber, writing to stderr. Call once, early.
pub fn init(settings: &Settings) {
    let config = &settings.config.log;
    // Colour only for a person at a terminal: in a file or a pipe the
    // escape codes are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(settings))
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_FILTER.set(Box::new(move |filter| {
                handle.reload(filter).map_err(|err| err.to_string())
            }));
            builder.try_init()
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_FILTER.set(Box::new(move |filter| {
                handle.reload(filter).map_err(|err| err.to_string())
            }));
            builder.try_init()
        }
    };
    if let Err(err) = result {
        eprintln!("pushgate: logging already set up: {err}");
    }
}

/// Takes `log.level` of a reload; nothing when logging was not set up
/// here (tests). The format cannot change while running.
pub fn set_level(settings: &Settings) {
    if let Some(set) = SET_FILTER.get() {
        if let Err(err) = set(filter(settings)) {
            tracing::warn!(error = %err, "log.level could not be changed");
        }
    }
}
