//! Kubernetes operator that exports Mixpanel cohorts to Kameleoon.

pub mod budget;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod http;
pub mod identity;
pub mod kameleoon;
pub mod members;
pub mod memory;
pub mod metrics;
pub mod mixpanel;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod store;

/// Formats an error and its sources as one line, outermost first, the form
/// status messages, Events and logs use.
pub fn failure_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}
pub mod cli;
pub mod leader;
pub mod operator;
pub mod server;
pub mod telemetry;
