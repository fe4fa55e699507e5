//! The two controllers, the state they share, and how they start.
//!
//! Each watched scope (the whole cluster, or one namespace per `--namespace`)
//! runs a KameleoonConnection controller and a CohortSync controller over
//! its own watches. Clients, query budgets, caches and metrics are shared by
//! every scope.

mod cohort_sync;
mod connection;
mod export;
mod failure;
mod progress;
mod reader;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Resource, ResourceExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::budget::{Budgets, Limits, ProjectBudget, ProjectKey};
use crate::crd::{CohortSync, CohortSyncStatus, KameleoonConnection};
use crate::kameleoon::KameleoonClient;
use crate::metrics::Metrics;
use crate::mixpanel::{self, MixpanelClient};
use crate::retry::RetryPolicy;

/// Connection events a slow subscriber may fall behind by before the watch
/// waits for it.
const CONNECTION_EVENT_BUFFER: usize = 1024;

/// Field manager of every server-side apply the operator sends.
pub const FIELD_MANAGER: &str = "kameleoon-cohort-operator";

/// Settings of the controllers, from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespaces to watch; empty means every namespace.
    pub namespaces: Vec<String>,
    /// Replaces every Dynamic interval; for tests only.
    pub interval_override: Option<Duration>,
    /// How often a Connected connection is checked again.
    pub revalidate_interval: Duration,
    /// Delay before the first retry of a failed export.
    pub failure_backoff_base: Duration,
    /// Longest delay between retries of a failed export.
    pub failure_backoff_max: Duration,
    /// Retries of one call to Mixpanel or Kameleoon.
    pub call_retry: RetryPolicy,
    /// Largest Data API request body.
    pub max_body_bytes: usize,
    /// Whether follow-up Engage pages count toward the hourly query allowance.
    pub count_follow_up_pages: bool,
    /// Exports that run at once per Mixpanel project.
    pub exports_per_project: usize,
    /// How often progress is written to status during an export.
    pub progress_interval: Duration,
    /// How long a cohort list is reused before it is read again.
    pub cohort_cache_ttl: Duration,
    /// Window of the Mixpanel query allowance: an hour, shorter only in benchmarks.
    pub query_window: Duration,
}

/// A project's cohort list and when it was read.
struct CachedCohorts {
    read_at: tokio::time::Instant,
    list: Arc<Vec<mixpanel::Cohort>>,
}

/// A Kameleoon site's custom data and when they were listed.
struct CachedCustomData {
    read_at: tokio::time::Instant,
    list: Arc<Vec<crate::kameleoon::CustomData>>,
}

/// Clients of the two services.
pub struct Clients {
    /// Mixpanel client.
    pub mixpanel: MixpanelClient,
    /// Kameleoon client.
    pub kameleoon: KameleoonClient,
}

/// State shared by every controller of the process.
pub struct Shared {
    /// Kubernetes client.
    pub client: kube::Client,
    /// Settings.
    pub config: Config,
    /// Mixpanel client.
    pub mixpanel: MixpanelClient,
    /// Kameleoon client (with its token cache).
    pub kameleoon: KameleoonClient,
    /// Query budgets per Mixpanel project.
    pub budgets: Budgets,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Cancelled when the process shuts down; exports stop between batches.
    pub shutdown: CancellationToken,
    /// Readiness state, which failing watches mark.
    pub health: Arc<crate::server::Health>,
    /// Running exports, so that memory is released after the last one.
    pub exports: Arc<crate::memory::ExportActivity>,
    cohorts: Mutex<HashMap<ProjectKey, CachedCohorts>>,
    custom_data: Mutex<HashMap<i64, CachedCustomData>>,
    export_slots: Mutex<HashMap<ProjectKey, Arc<Semaphore>>>,
    validations: Mutex<HashMap<String, connection::Validation>>,
    intended: Mutex<HashMap<String, CohortSyncStatus>>,
}

impl Shared {
    /// Builds the shared state.
    pub fn new(
        client: kube::Client,
        config: Config,
        clients: Clients,
        metrics: Arc<Metrics>,
        reporter: Reporter,
        shutdown: CancellationToken,
        health: Arc<crate::server::Health>,
    ) -> Self {
        Self {
            health,
            exports: Arc::default(),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            budgets: Budgets::with_window(config.query_window),
            config,
            mixpanel: clients.mixpanel,
            kameleoon: clients.kameleoon,
            metrics,
            shutdown,
            cohorts: Mutex::default(),
            custom_data: Mutex::default(),
            export_slots: Mutex::default(),
            validations: Mutex::default(),
            intended: Mutex::default(),
        }
    }

    fn export_slots(&self, key: ProjectKey) -> Arc<Semaphore> {
        let mut slots = self.export_slots.lock().expect("export slot lock");
        slots
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.exports_per_project.max(1))))
            .clone()
    }

    /// Publishes an Event; a failure is logged and otherwise ignored, because
    /// Events are informational.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(crate::http::truncate(&note, 1000)),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, reason, "Failed to publish Event");
        }
    }
}

/// State of one watched scope.
pub struct Scope {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Cache of the scope's connections.
    pub connections: Store<KameleoonConnection>,
    /// Cache of the scope's syncs.
    pub syncs: Store<CohortSync>,
    /// True once the connection cache contains its first complete list.
    /// Reconciliations wait on this rather than on
    /// `Store::wait_until_ready`, whose one-shot channel wakes only the last
    /// of several tasks waiting at once, so the others would hang.
    pub connections_ready: tokio::sync::watch::Receiver<bool>,
    /// Channel to the connection controller for connections to validate again.
    revalidate: tokio::sync::mpsc::UnboundedSender<ObjectRef<KameleoonConnection>>,
}

impl Scope {
    /// Validates a connection again now, dropping its cached result. An
    /// export found its credentials rejected, so an earlier Connected
    /// condition would mislead.
    pub fn revalidate(&self, connection: &KameleoonConnection) {
        if let Some(uid) = connection.uid() {
            self.shared
                .validations
                .lock()
                .expect("validation lock")
                .remove(&uid);
        }
        // The receiver lives as long as the controllers. Once they have
        // stopped, nothing is left to validate.
        let _ = self.revalidate.send(ObjectRef::from_obj(connection));
    }

    /// Query budget of a connection's Mixpanel project, with the strictest
    /// limits any connection of the scope sets for that project.
    pub fn budget(&self, connection: &KameleoonConnection) -> (ProjectKey, Arc<ProjectBudget>) {
        project_budget(&self.shared, &self.connections, connection)
    }
}

/// Returns the query budget of a connection's Mixpanel project, after
/// updating it to the strictest limits that the cached connections set.
fn project_budget(
    shared: &Shared,
    connections: &Store<KameleoonConnection>,
    connection: &KameleoonConnection,
) -> (ProjectKey, Arc<ProjectBudget>) {
    let key = project_key(connection);
    let mut limits = limits_of(connection);
    for other in connections.state() {
        if project_key(&other) == key {
            let theirs = limits_of(&other);
            limits.per_hour = limits.per_hour.min(theirs.per_hour);
            limits.concurrent = limits.concurrent.min(theirs.concurrent);
        }
    }
    (key, shared.budgets.project(key, limits))
}

fn project_key(connection: &KameleoonConnection) -> ProjectKey {
    ProjectKey {
        region: connection.spec.mixpanel.region,
        project_id: connection.spec.mixpanel.project_id,
    }
}

fn limits_of(connection: &KameleoonConnection) -> Limits {
    Limits {
        per_hour: connection.spec.mixpanel.queries_per_hour(),
        concurrent: connection.spec.mixpanel.max_concurrent_queries(),
    }
}

/// A reconciliation failure that the controller runtime retries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API request failed.
    #[error("Kubernetes API request failed while {action}")]
    Kube {
        /// What was attempted.
        action: &'static str,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

fn error_policy<K: Resource>(object: Arc<K>, error: &Error, _scope: Arc<Scope>) -> Action {
    tracing::warn!(
        namespace = %object.meta().namespace.as_deref().unwrap_or_default(),
        name = %object.meta().name.as_deref().unwrap_or_default(),
        error = %crate::failure_chain(error),
        "Reconciliation failed; retrying in 30s"
    );
    Action::requeue(Duration::from_secs(30))
}

/// Span of one reconciliation, so that every log line of an object's work
/// names the object's namespace and name. A span's level only decides
/// whether it is recorded; ERROR keeps it with any log level but `off`.
fn object_span<K: Resource>(object: &K) -> tracing::Span {
    tracing::error_span!(
        "reconcile",
        namespace = %object.meta().namespace.as_deref().unwrap_or_default(),
        name = %object.meta().name.as_deref().unwrap_or_default()
    )
}

/// Changes of a CohortSync that need a reconciliation: the spec (through the
/// generation), deletion, finalizers and the export request annotations.
/// Status and label changes are left out, so the controller's own status
/// writes never trigger it.
fn sync_trigger(sync: &CohortSync) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    sync.meta().generation.hash(&mut hasher);
    sync.meta().deletion_timestamp.is_some().hash(&mut hasher);
    sync.finalizers().hash(&mut hasher);
    for key in [
        crate::schedule::SYNC_REQUEST_ANNOTATION,
        crate::schedule::FLUX_REQUEST_ANNOTATION,
        cohort_sync::SKIP_CLEANUP_ANNOTATION,
    ] {
        sync.annotations().get(key).hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// Runs both controllers for every configured scope until shutdown.
pub async fn run(shared: Arc<Shared>) {
    let scopes: Vec<Option<String>> = if shared.config.namespaces.is_empty() {
        vec![None]
    } else {
        shared.config.namespaces.iter().cloned().map(Some).collect()
    };
    futures::future::join_all(scopes.into_iter().map(|ns| run_scope(shared.clone(), ns))).await;
}

fn api<K>(client: &kube::Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Drops `metadata.managedFields` from watched objects before they are
/// cached: the controllers never read them, and with server-side apply they
/// are often the largest part of an object.
fn drop_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Logs watch failures as errors naming the resource, and marks the process
/// unready until the watch recovers: a controller that cannot watch must
/// not look healthy.
fn observe<T>(
    stream: impl futures::Stream<Item = Result<T, watcher::Error>>,
    resource: &'static str,
    health: Arc<crate::server::Health>,
) -> impl futures::Stream<Item = Result<T, watcher::Error>> {
    stream.inspect(move |item| match item {
        Ok(_) => health.watch_recovered(resource),
        Err(error) => {
            let text = crate::failure_chain(error);
            tracing::error!(resource, error = %text, "Watch failed; check that the operator may list and watch {resource}");
            health.watch_failed(resource, text);
        }
    })
}

async fn run_scope(shared: Arc<Shared>, namespace: Option<String>) {
    let client = shared.client.clone();
    let health = shared.health.clone();
    let connections_api: Api<KameleoonConnection> = api(&client, &namespace);
    let syncs_api: Api<CohortSync> = api(&client, &namespace);
    let secrets_api: Api<PartialObjectMeta<Secret>> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };

    // One watch of the connections feeds both controllers. Subscribers get an
    // object only after the cache holds it, so a sync woken by its
    // connection's change always reads that change from the cache.
    let (connections, connection_writer) = reflector::store_shared(CONNECTION_EVENT_BUFFER);
    let connection_updates = connection_writer
        .subscribe()
        .expect("a shared store accepts subscribers");
    let (connections_listed, connections_ready) = tokio::sync::watch::channel(false);
    let connection_watch = observe(
        watcher(connections_api, watcher::Config::default()),
        "kameleoonconnections",
        health.clone(),
    )
    .default_backoff()
    .modify(drop_managed_fields)
    .reflect_shared(connection_writer)
    .take_until(shared.shutdown.clone().cancelled_owned())
    .for_each(move |event| {
        if let Ok(watcher::Event::InitDone) = event {
            connections_listed.send_replace(true);
        }
        std::future::ready(())
    });
    // The connection controller reacts to spec changes only: its own status
    // writes must not trigger it again. Secret changes arrive through their
    // own watch.
    let mut generations = HashMap::new();
    let limits_shared = shared.clone();
    let limits_store = connections.clone();
    let spec_changes = connection_updates.clone().filter(move |connection| {
        let uid = connection.uid().unwrap_or_default();
        let changed = generations.insert(uid, connection.meta().generation)
            != Some(connection.meta().generation);
        if changed {
            // New query limits apply at once, also to callers already
            // waiting for the project's budget. A validation waiting with
            // the old limits would otherwise hold this connection's
            // reconciliation, so nothing would apply the new ones.
            project_budget(&limits_shared, &limits_store, connection);
        }
        std::future::ready(changed)
    });
    let connection_controller = Controller::for_shared_stream(spec_changes, connections.clone());

    let (syncs, sync_writer) = reflector::store();
    shared.metrics.track_syncs(syncs.clone());
    let sync_stream = observe(
        watcher(syncs_api, watcher::Config::default()),
        "cohortsyncs",
        health.clone(),
    )
    .default_backoff()
    .modify(drop_managed_fields)
    .reflect(sync_writer)
    .touched_objects()
    .predicate_filter(sync_trigger, Default::default());
    let sync_controller = Controller::for_stream(sync_stream, syncs.clone());

    let (revalidate, revalidations) = tokio::sync::mpsc::unbounded_channel();
    let scope = Arc::new(Scope {
        shared: shared.clone(),
        connections: connections.clone(),
        syncs: syncs.clone(),
        connections_ready,
        revalidate,
    });
    let revalidations = futures::stream::unfold(revalidations, |mut receiver| async move {
        receiver.recv().await.map(|object| (object, receiver))
    });

    // The operator's own member Secrets change with every export; they never
    // hold credentials, so they are filtered out at the source.
    let secret_watch =
        watcher::Config::default().labels(&format!("!{}", crate::store::SYNC_UID_LABEL));
    let secret_stream = observe(
        watcher(secrets_api, secret_watch),
        "secrets",
        health.clone(),
    )
    .default_backoff()
    .modify(drop_managed_fields)
    .touched_objects();
    let secret_store = connections.clone();
    let connection_controller = connection_controller
        .watches_stream(secret_stream, move |secret| {
            connection::referencing_secret(&secret_store, &secret)
        })
        .reconcile_on(revalidations)
        .graceful_shutdown_on(shared.shutdown.clone().cancelled_owned())
        .run(
            |connection, scope| {
                let span = object_span(connection.as_ref());
                connection::reconcile(connection, scope).instrument(span)
            },
            error_policy,
            scope.clone(),
        )
        .for_each(|_| async {});

    // Syncs follow their connection's readiness; the mapper sees every
    // connection change, including status.
    let sync_store = syncs.clone();
    let sync_controller = sync_controller
        .watches_shared_stream(connection_updates, move |connection| {
            cohort_sync::using_connection(&sync_store, &connection)
        })
        .graceful_shutdown_on(shared.shutdown.clone().cancelled_owned())
        .run(
            |sync, scope| {
                let span = object_span(sync.as_ref());
                cohort_sync::reconcile(sync, scope).instrument(span)
            },
            error_policy,
            scope,
        )
        .for_each(|_| async {});

    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("(all)"),
        "Controllers started"
    );
    futures::join!(connection_watch, connection_controller, sync_controller);
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("(all)"),
        "Controllers stopped"
    );
}

/// Looks up an object of a scope's cache.
fn lookup<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(namespace))
}
