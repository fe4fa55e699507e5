//! Runs the stand-in Mixpanel and Kameleoon servers until interrupted.
//!
//! The chosen URLs are printed as one JSON line on standard output and, with
//! `--urls-file`, written to a file once both servers listen.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use standins::limits;
use standins::{KameleoonConfig, KameleoonStandin, MixpanelConfig, MixpanelStandin, Seed};

#[derive(Debug, Parser)]
#[command(
    name = "standins",
    about = "Runs stand-in Mixpanel and Kameleoon servers on loopback addresses for tests, demos and benchmarks"
)]
struct Args {
    /// Seed file (YAML or JSON) with Mixpanel accounts, projects and cohorts and
    /// Kameleoon clients and sites. Without it both servers start empty.
    #[arg(long)]
    seed: Option<PathBuf>,

    /// Address of the Mixpanel stand-in; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    mixpanel_addr: SocketAddr,

    /// Address of the Kameleoon stand-in (Automation API and Data API); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    kameleoon_addr: SocketAddr,

    /// File to write the base URLs to, as JSON, once both servers listen.
    #[arg(long)]
    urls_file: Option<PathBuf>,

    /// Mixpanel queries per project in any hour; 0 is unlimited.
    #[arg(long, default_value_t = limits::MIXPANEL_QUERIES_PER_HOUR)]
    mixpanel_hourly_limit: u32,

    /// Mixpanel queries running at once per project.
    #[arg(long, default_value_t = limits::MIXPANEL_MAX_CONCURRENT_QUERIES)]
    mixpanel_max_concurrent: usize,

    /// Profiles per Mixpanel Engage page.
    #[arg(long, default_value_t = limits::MIXPANEL_PAGE_SIZE)]
    mixpanel_page_size: usize,

    /// Count Engage pages after the first toward the hourly limit.
    #[arg(long)]
    count_follow_up_pages: bool,

    /// Retry-After, in seconds, on the Mixpanel stand-in's 429 responses.
    #[arg(long)]
    mixpanel_retry_after: Option<u64>,

    /// Idle time after which a Mixpanel paging session expires, in seconds.
    #[arg(long, default_value_t = limits::MIXPANEL_SESSION_IDLE_SECONDS)]
    session_idle_seconds: u64,

    /// Length of the Mixpanel query-limit window, in seconds (one hour; shorter
    /// only for benchmarks that must reach the limit in minutes).
    #[arg(long, default_value_t = 3600)]
    mixpanel_query_window_seconds: u64,

    /// Largest Kameleoon /visit/events body, in bytes; larger ones get 413.
    #[arg(long, default_value_t = limits::DEFAULT_EVENTS_BODY_LIMIT_BYTES)]
    kameleoon_body_limit: usize,

    /// Lifetime of Kameleoon access tokens, in seconds.
    #[arg(long, default_value_t = limits::TOKEN_LIFETIME_SECONDS)]
    token_lifetime: u64,

    /// Turn off the Kameleoon Automation API limits (50 per 10 s, 1,000 per hour).
    #[arg(long)]
    no_automation_rate_limits: bool,

    /// Turn off both the Automation API limits and the Mixpanel hourly limit.
    /// The Mixpanel concurrency limit stays.
    #[arg(long)]
    no_rate_limits: bool,

    /// Accept Data API requests without a bearer token.
    #[arg(long)]
    data_api_auth_optional: bool,

    /// Accept mappingValue lines on sites without a mapping-identifier custom data.
    #[arg(long)]
    allow_mapping_without_identifier: bool,
}

impl Args {
    fn mixpanel_config(&self) -> MixpanelConfig {
        MixpanelConfig {
            page_size: self.mixpanel_page_size,
            hourly_query_limit: if self.no_rate_limits {
                0
            } else {
                self.mixpanel_hourly_limit
            },
            max_concurrent_queries: self.mixpanel_max_concurrent,
            count_follow_up_pages: self.count_follow_up_pages,
            retry_after_seconds: self.mixpanel_retry_after,
            session_idle_timeout_ms: self.session_idle_seconds.saturating_mul(1000),
            query_window_ms: self.mixpanel_query_window_seconds.saturating_mul(1000),
        }
    }

    fn kameleoon_config(&self) -> KameleoonConfig {
        KameleoonConfig {
            token_lifetime_seconds: self.token_lifetime,
            events_body_limit_bytes: self.kameleoon_body_limit,
            automation_rate_limits: !(self.no_automation_rate_limits || self.no_rate_limits),
            data_api_auth_required: !self.data_api_auth_optional,
            require_mapping_identifier: !self.allow_mapping_without_identifier,
            ..KameleoonConfig::default()
        }
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so a
/// reader polling for the file never reads it half written.
fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

async fn wait_for_shutdown() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; stop with Ctrl-C");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

async fn run(args: Args) -> Result<(), String> {
    let seed = match &args.seed {
        Some(path) => Seed::from_path(path).map_err(|error| error.to_string())?,
        None => Seed::default(),
    };
    let mixpanel =
        MixpanelStandin::start_on(args.mixpanel_addr, seed.mixpanel, args.mixpanel_config())
            .await
            .map_err(|error| format!("failed to start the Mixpanel stand-in: {error}"))?;
    let kameleoon =
        KameleoonStandin::start_on(args.kameleoon_addr, seed.kameleoon, args.kameleoon_config())
            .await
            .map_err(|error| format!("failed to start the Kameleoon stand-in: {error}"))?;

    let urls = json!({
        "mixpanel": mixpanel.url(),
        "kameleoon": kameleoon.url(),
        "kameleoon_automation": kameleoon.url(),
        "kameleoon_data": kameleoon.url(),
    });
    if let Some(path) = &args.urls_file {
        write_atomically(path, &format!("{urls:#}\n"))
            .map_err(|error| format!("failed to write {}: {error}", path.display()))?;
    }
    println!("{urls}");

    tracing::info!(mixpanel = %mixpanel.url(), kameleoon = %kameleoon.url(), "stand-ins ready");
    wait_for_shutdown().await;
    tracing::info!("shutting down");
    drop(mixpanel);
    drop(kameleoon);
    if let Some(path) = &args.urls_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("standins: {message}");
            ExitCode::FAILURE
        }
    }
}
