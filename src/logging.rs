//! Log output: `tracing` events, human-readable by default, JSON lines on request.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, writing to stderr. `level` is an `EnvFilter`
/// directive such as `info` or `ccat_workflow_manager=debug`; `RUST_LOG` wins when set.
/// A second call (as from a Python process that already set one up) changes nothing.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Colours only on a terminal, and never with `NO_COLOR` set to anything but an empty
/// string (no-color.org): a file or the journal gets plain text.
fn colours(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(super::colours(true, None));
        assert!(super::colours(true, Some(OsStr::new(""))));
        assert!(!super::colours(true, Some(OsStr::new("1"))));
        assert!(!super::colours(false, None));
    }
}
