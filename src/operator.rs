//! Start-up and shutdown of the `run` command.

use std::sync::Arc;

use kube::api::{Api, ListParams};
use kube::runtime::events::Reporter;
use tokio_util::sync::CancellationToken;
use tower::limit::ConcurrencyLimitLayer;

use crate::cli::RunArgs;
use crate::controller::{self, Clients, Shared};
use crate::crd::KameleoonConnection;
use crate::leader::{LeaderElector, Settings};
use crate::metrics::Metrics;
use crate::server::{self, Health};
use crate::{kameleoon, mixpanel};

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable Kubernetes configuration.
    #[error("cannot configure the Kubernetes client")]
    Config(#[source] kube::Error),
    /// The CRDs are missing or the API server refused the first request.
    #[error(
        "cannot list KameleoonConnections; install the CRDs (kubectl apply -f crds/) and check the \
         operator's RBAC"
    )]
    Crds(#[source] kube::Error),
    /// An HTTP client could not be built.
    #[error("cannot build an HTTP client")]
    Http(#[source] reqwest::Error),
    /// A listener could not be bound.
    #[error("cannot listen on the metrics or health address")]
    Listen(#[source] std::io::Error),
    /// Leader election needs a namespace.
    #[error("leader election needs a namespace: set --leader-election-namespace or POD_NAMESPACE")]
    LeaseNamespace,
    /// Another replica took the lease.
    #[error("lost the leader Lease; exiting so that only the new leader exports")]
    LostLease,
}

/// Builds the Kubernetes client from the kubeconfig or the in-cluster
/// environment, with at most `concurrency` requests in flight. The client
/// speaks HTTP/1.1 and keeps every idle connection, so without a limit a
/// thousand syncs reconciled at once would open, and then keep, a thousand
/// TLS connections. A watch occupies its slot only until the response starts.
async fn kube_client(concurrency: u16) -> Result<kube::Client, Error> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::Config(kube::Error::InferConfig(e)))?;
    let builder = kube::client::ClientBuilder::try_from(config).map_err(Error::Config)?;
    Ok(builder
        .with_layer(&ConcurrencyLimitLayer::new(usize::from(concurrency)))
        .build())
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<(), Error> {
    let client = kube_client(args.kube_api_concurrency).await?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let listeners = server::bind(args.metrics_address, args.health_address)
        .await
        .map_err(Error::Listen)?;
    // The bound addresses, not the configured ones: port 0 picks a free port.
    let metrics_address = listeners.0.local_addr().map_err(Error::Listen)?;
    let health_address = listeners.1.local_addr().map_err(Error::Listen)?;
    tracing::info!(metrics = %metrics_address, health = %health_address, "Serving metrics and health endpoints");
    let server = tokio::spawn(server::serve(
        listeners,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    check_crds(&client, &args.namespaces).await?;
    health.set_started();

    let config = args.config();
    let mixpanel_endpoints = match &args.mixpanel_url {
        Some(url) => mixpanel::Endpoints::with_override(url.clone()),
        None => mixpanel::Endpoints::production(),
    };
    let mut kameleoon_endpoints = kameleoon::Endpoints::production();
    if let Some(url) = &args.kameleoon_api_url {
        kameleoon_endpoints.api = url.clone();
    }
    if let Some(url) = &args.kameleoon_data_url {
        kameleoon_endpoints.data = url.clone();
    }
    let clients = Clients {
        mixpanel: mixpanel::MixpanelClient::new(mixpanel_endpoints, args.request_timeout)
            .map_err(Error::Http)?,
        kameleoon: kameleoon::KameleoonClient::new(kameleoon_endpoints, args.request_timeout)
            .map_err(Error::Http)?,
    };
    let identity = identity();
    let reporter = Reporter {
        controller: "kameleoon-cohort-operator".into(),
        instance: Some(identity.clone()),
    };
    let shared = Arc::new(Shared::new(
        client.clone(),
        config,
        clients,
        metrics.clone(),
        reporter,
        shutdown.clone(),
        health,
    ));

    tokio::spawn(shared.exports.clone().release_when_idle(shutdown.clone()));
    let result = if args.leader_elect {
        run_as_leader(&args, client, identity, shared, &shutdown).await
    } else {
        metrics.leader.set(1);
        controller::run(shared).await;
        Ok(())
    };
    shutdown.cancel();
    let _ = server.await;
    tracing::info!("Stopped");
    result
}

async fn run_as_leader(
    args: &RunArgs,
    client: kube::Client,
    identity: String,
    shared: Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let namespace = args
        .leader_election_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .ok_or(Error::LeaseNamespace)?;
    let elector = LeaderElector::new(
        client,
        Settings {
            name: args.leader_election_id.clone(),
            namespace,
            identity,
            lease_duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        },
    );
    if !elector.acquire(shutdown).await {
        return Ok(());
    }
    shared.metrics.leader.set(1);
    // The Lease is renewed until the controllers have stopped, so no other
    // replica starts exporting while this one finishes its current batch.
    let release = CancellationToken::new();
    let controllers = controller::run(shared.clone());
    let hold = elector.hold(&release);
    tokio::pin!(controllers, hold);
    // Holding ends before the release only when the Lease is lost.
    let lost = tokio::select! {
        _ = &mut hold => true,
        () = &mut controllers => false,
    };
    if lost {
        // Stop exporting at once: the exports stop at their next batch
        // boundary and the new leader redoes them.
        shutdown.cancel();
        controllers.await;
        shared.metrics.leader.set(0);
        return Err(Error::LostLease);
    }
    release.cancel();
    hold.await;
    shared.metrics.leader.set(0);
    Ok(())
}

async fn check_crds(client: &kube::Client, namespaces: &[String]) -> Result<(), Error> {
    let api: Api<KameleoonConnection> = match namespaces.first() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list(&ListParams::default().limit(1))
        .await
        .map_err(Error::Crds)?;
    Ok(())
}

fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kameleoon-cohort-operator".to_string());
    format!("{host}_{}", std::process::id())
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "Cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
        }
        shutdown.cancel();
    });
}
