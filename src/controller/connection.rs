//! KameleoonConnection controller: reads the referenced Secrets, checks the
//! credentials against both services and reports `Connected`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use tokio::time::Instant;

use super::failure::Failure;
use super::reader::ProjectReader;
use super::{Error, FIELD_MANAGER, Scope};
use crate::conditions::{self, Status, Summary, reasons, types};
use crate::crd::{KameleoonConnection, KameleoonConnectionStatus, MatchBy, SiteStatus};
use crate::credentials::{self, ConnectionCredentials};
use crate::mixpanel::ProjectAccess;

/// Result of the last check of a connection, kept in memory so that a
/// reconciliation without a change in spec or Secrets does not spend
/// Mixpanel queries.
#[derive(Clone)]
pub struct Validation {
    generation: Option<i64>,
    secret_versions: (String, String),
    at: Instant,
    outcome: Result<SiteStatus, Failure>,
}

/// Maps a Secret to the connections of its namespace that reference it.
pub fn referencing_secret(
    connections: &Store<KameleoonConnection>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<KameleoonConnection>> {
    let namespace = secret.namespace();
    let name = secret.name_any();
    connections
        .state()
        .iter()
        .filter(|c| c.namespace() == namespace)
        .filter(|c| {
            c.spec.mixpanel.credentials_secret_ref.name == name
                || c.spec.kameleoon.credentials_secret_ref.name == name
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// Reconciles one connection.
pub async fn reconcile(
    connection: Arc<KameleoonConnection>,
    scope: Arc<Scope>,
) -> Result<Action, Error> {
    let shared = &scope.shared;
    shared
        .metrics
        .reconciliations
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: "kameleoonconnection",
        })
        .inc();
    let namespace = connection.namespace().unwrap_or_default();
    let name = connection.name_any();
    let uid = connection.uid().unwrap_or_default();
    let generation = connection.meta().generation;
    let config = &shared.config;

    let credentials = credentials::read(&shared.client, &namespace, &connection.spec).await;
    let outcome = match &credentials {
        Err(error) => Err(Failure::credentials(error)),
        Ok(credentials) => {
            let remembered = shared
                .validations
                .lock()
                .expect("validation lock")
                .get(&uid)
                .cloned()
                .filter(|v| {
                    v.generation == generation
                        && v.secret_versions == credentials.versions
                        && v.at.elapsed() < config.revalidate_interval
                });
            match remembered {
                Some(validation) => validation.outcome,
                None => {
                    let outcome = validate(&scope, &connection, credentials)
                        .await
                        .map_err(|failure| failure.naming_secrets(&connection));
                    shared.validations.lock().expect("validation lock").insert(
                        uid.clone(),
                        Validation {
                            generation,
                            secret_versions: credentials.versions.clone(),
                            at: Instant::now(),
                            outcome: outcome.clone(),
                        },
                    );
                    outcome
                }
            }
        }
    };

    let before = connection.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let mut status = before.clone();
    status.observed_generation = generation;
    let summary = match &outcome {
        Ok(site) => {
            let message = format!(
                "Kameleoon site {} ({}) and Mixpanel project {} accept the credentials",
                connection.spec.kameleoon.site_code,
                site.name.as_deref().unwrap_or("unnamed"),
                connection.spec.mixpanel.project_id
            );
            conditions::set(
                &mut status.conditions,
                types::CONNECTED,
                Status::True,
                reasons::CONNECTED,
                message.clone(),
                generation,
                now,
            );
            status.site = Some(site.clone());
            Summary::Ready {
                reason: reasons::CONNECTED,
                message,
            }
        }
        Err(failure) => {
            conditions::set(
                &mut status.conditions,
                types::CONNECTED,
                Status::False,
                failure.reason,
                failure.message.clone(),
                generation,
                now,
            );
            if failure.stalled {
                Summary::Stalled {
                    reason: failure.reason,
                    message: failure.message.clone(),
                }
            } else {
                Summary::Reconciling {
                    ready: Status::False,
                    reason: failure.reason,
                    message: format!("{}; retrying", failure.message),
                }
            }
        }
    };
    summary.apply(&mut status.conditions, generation, now);

    let was_connected = conditions::is_true(&before.conditions, types::CONNECTED);
    if status != before {
        let api: Api<KameleoonConnection> = Api::namespaced(shared.client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": "cohortsync.io/v1alpha1",
            "kind": "KameleoonConnection",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(|source| Error::Kube {
            action: "writing KameleoonConnection status",
            source,
        })?;
    }
    match &outcome {
        Ok(_) if !was_connected => {
            tracing::info!(%namespace, %name, "Connection validated");
            shared
                .event(
                    connection.as_ref(),
                    EventType::Normal,
                    reasons::CONNECTED,
                    "Validate",
                    status_message(&status),
                )
                .await;
        }
        Err(failure)
            if was_connected
                || before.conditions.is_empty()
                || reason_changed(&before, failure) =>
        {
            tracing::warn!(%namespace, %name, reason = failure.reason, error = %failure.message, "Connection not usable");
            shared
                .event(
                    connection.as_ref(),
                    EventType::Warning,
                    failure.reason,
                    "Validate",
                    failure.message.clone(),
                )
                .await;
        }
        _ => {}
    }

    if let Err(failure) = &outcome {
        shared
            .metrics
            .reconcile_errors
            .get_or_create(&crate::metrics::ErrorLabels {
                controller: "kameleoonconnection",
                reason: failure.reason,
            })
            .inc();
        // Secret changes trigger a reconciliation at once; the delay covers
        // the services coming back.
        let delay = if failure.stalled {
            config.revalidate_interval.min(Duration::from_secs(300))
        } else {
            Duration::from_secs(30)
        };
        return Ok(Action::requeue(delay));
    }
    Ok(Action::requeue(config.revalidate_interval))
}

fn reason_changed(before: &KameleoonConnectionStatus, failure: &Failure) -> bool {
    conditions::find(&before.conditions, types::CONNECTED)
        .is_none_or(|c| c.reason != failure.reason)
}

fn status_message(status: &KameleoonConnectionStatus) -> String {
    conditions::find(&status.conditions, types::CONNECTED)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Checks the credentials for real: a Kameleoon token and the site, then a
/// cohort list of the Mixpanel project (one query of its budget).
async fn validate(
    scope: &Scope,
    connection: &KameleoonConnection,
    credentials: &ConnectionCredentials,
) -> Result<SiteStatus, Failure> {
    let shared = &scope.shared;
    let spec = &connection.spec;
    shared.kameleoon.forget_token(&credentials.kameleoon).await;
    let site = shared
        .kameleoon
        .find_site(&credentials.kameleoon, &spec.kameleoon.site_code)
        .await
        .map_err(|e| Failure::kameleoon(&e))?
        .ok_or_else(|| {
            Failure::stalled(
                reasons::KAMELEOON_SITE_NOT_FOUND,
                format!(
                    "no Kameleoon site with code {} is visible to client id {}: check \
                     spec.kameleoon.siteCode and the API client's access to the site",
                    spec.kameleoon.site_code, credentials.kameleoon.client_id
                ),
            )
        })?;
    if spec.kameleoon.match_by == MatchBy::MappingIdentifier {
        // The Data API accepts `mappingValue` lines for a site without a
        // mapping identifier and drops them later, so the export would look
        // successful while no visitor gets the data.
        let custom_data = shared
            .kameleoon
            .list_custom_data(&credentials.kameleoon, site.id)
            .await
            .map_err(|e| Failure::kameleoon(&e))?;
        if !custom_data.iter().any(|c| c.is_mapping_identifier) {
            return Err(Failure::stalled(
                reasons::KAMELEOON_MAPPING_IDENTIFIER_MISSING,
                format!(
                    "spec.kameleoon.matchBy is MappingIdentifier, but Kameleoon site {} has no \
                     custom data marked as its cross-device mapping identifier: mark one in \
                     Kameleoon, or set matchBy to VisitorCode",
                    spec.kameleoon.site_code
                ),
            ));
        }
    }
    let (key, budget) = scope.budget(connection);
    let access = ProjectAccess {
        project_id: spec.mixpanel.project_id,
        region: spec.mixpanel.region,
        credentials: credentials.mixpanel.clone(),
    };
    ProjectReader::new(shared, access, key, budget, None)
        .cohorts(true)
        .await
        .map_err(|e| Failure::mixpanel(&e))?;
    Ok(SiteStatus {
        id: site.id,
        name: site.name,
    })
}
