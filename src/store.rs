//! The identifiers a CohortSync last exported, kept in the cluster.
//!
//! A snapshot is the sorted identifiers, gzip-compressed and cut into chunks
//! of at most [`CHUNK_BYTES`], each chunk one immutable Secret (identifiers
//! can be personal data) labelled with the sync's uid and owned by the sync,
//! so the garbage collector removes them with it. Snapshots carry a sequence
//! number; a reader takes the newest snapshot whose chunks are all present,
//! so a write cut short by a crash leaves the previous snapshot in force.
//! The export writes the union of the previous and the new members before it
//! sends anything, and the new members only after Kameleoon accepted every
//! batch: the snapshot in force always covers everyone who may carry the
//! custom data. A union is marked as such ([`SnapshotKind::Union`]), because
//! some of its members may not carry their new value yet: the next export
//! sends every member again instead of only the differences.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::crd::{CohortSync, MatchBy};

/// Largest compressed chunk per Secret. The API server stores objects up to
/// 1.5 MiB in etcd and Secrets up to 1 MiB of data; 512 KiB leaves room for
/// base64 and metadata.
pub const CHUNK_BYTES: usize = 512 * 1024;

/// Label with the uid of the owning CohortSync.
pub const SYNC_UID_LABEL: &str = "cohortsync.io/sync-uid";
/// Label that marks Secrets managed by the operator.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY: &str = "kameleoon-cohort-operator";
const SEQUENCE_ANNOTATION: &str = "cohortsync.io/snapshot-sequence";
const CHUNK_ANNOTATION: &str = "cohortsync.io/chunk";
const CHUNKS_ANNOTATION: &str = "cohortsync.io/chunks";
const MEMBERS_ANNOTATION: &str = "cohortsync.io/members";
const TARGET_ANNOTATION: &str = "cohortsync.io/target";
const KIND_ANNOTATION: &str = "cohortsync.io/snapshot-kind";
const DATA_KEY: &str = "members.gz";
const SECRET_TYPE: &str = "cohortsync.io/members";

/// Where a snapshot's identifiers carry the custom data in Kameleoon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Kameleoon site code.
    pub site_code: String,
    /// Custom data index.
    pub custom_data_index: i64,
    /// Custom data name, for messages.
    pub custom_data_name: String,
    /// Identifier kind of the lines sent.
    pub match_by: MatchBy,
    /// Mixpanel cohort the identifiers came from.
    pub cohort_id: i64,
}

/// Meaning of a snapshot's identifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// The members of an export that Kameleoon accepted in full.
    Exported,
    /// The previous and the new members of an export that may not have
    /// finished, written before its first batch.
    Union,
}

impl SnapshotKind {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Exported => "exported",
            SnapshotKind::Union => "union",
        }
    }

    /// Reads the annotation value. Snapshots written before the annotation
    /// existed have none and count as exported; an unknown value counts as a
    /// union, which only costs a full export.
    fn parse(value: Option<&str>) -> Self {
        match value {
            None | Some("exported") => SnapshotKind::Exported,
            Some(_) => SnapshotKind::Union,
        }
    }
}

/// Identifiers in their stored, compressed form.
pub struct Encoded {
    /// Gzip-compressed sorted lines.
    pub compressed: Vec<u8>,
    /// Number of identifiers.
    pub members: u64,
}

/// A snapshot read back from the cluster.
pub struct Snapshot {
    /// Sequence number.
    pub sequence: u64,
    /// Whether the export that wrote it finished.
    pub kind: SnapshotKind,
    /// Where its members carry the custom data.
    pub target: Target,
    /// Number of identifiers.
    pub members: u64,
    /// The compressed identifiers, all chunks in order.
    pub compressed: Vec<u8>,
}

impl Snapshot {
    /// Iterates the identifiers in sorted order.
    pub fn ids(&self) -> impl Iterator<Item = std::io::Result<String>> + '_ {
        crate::members::decode(&self.compressed[..])
    }
}

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("cannot {action} the Secrets that record exported members")]
    Kube {
        /// What was attempted.
        action: &'static str,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Compressing the identifiers failed.
    #[error("cannot compress the exported members")]
    Encode(#[source] std::io::Error),
    /// The owning object has no uid yet.
    #[error("the CohortSync has no uid; it must be read from the API server")]
    MissingUid,
}

/// Snapshots of one CohortSync.
pub struct MemberStore {
    api: Api<Secret>,
    name: String,
    uid: String,
    owner: OwnerReference,
}

impl MemberStore {
    /// Opens the store of a CohortSync.
    pub fn new(client: kube::Client, sync: &CohortSync) -> Result<Self, Error> {
        let namespace = sync.namespace().unwrap_or_default();
        let uid = sync.uid().ok_or(Error::MissingUid)?;
        let owner = sync.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
        Ok(Self {
            api: Api::namespaced(client, &namespace),
            name: sync.name_any(),
            uid,
            owner,
        })
    }

    async fn list(&self) -> Result<Vec<Secret>, Error> {
        let params = ListParams::default().labels(&format!("{SYNC_UID_LABEL}={}", self.uid));
        self.api
            .list(&params)
            .await
            .map(|list| list.items)
            .map_err(|source| Error::Kube {
                action: "list",
                source,
            })
    }

    /// Names and sequence numbers of the stored chunks, without their data.
    async fn list_chunks(&self) -> Result<Vec<(String, Option<u64>)>, Error> {
        let params = ListParams::default().labels(&format!("{SYNC_UID_LABEL}={}", self.uid));
        let list = self
            .api
            .list_metadata(&params)
            .await
            .map_err(|source| Error::Kube {
                action: "list",
                source,
            })?;
        Ok(list
            .items
            .into_iter()
            .map(|item| {
                let sequence = item
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SEQUENCE_ANNOTATION))
                    .and_then(|v| v.parse().ok());
                (item.metadata.name.unwrap_or_default(), sequence)
            })
            .collect())
    }

    /// Reads the newest complete snapshot, if any.
    pub async fn load(&self) -> Result<Option<Snapshot>, Error> {
        Ok(newest_complete(self.list().await?))
    }

    /// Compresses sorted identifiers and writes them as a new snapshot of a
    /// target, then deletes the older snapshots. Returns the compressed form,
    /// so that an identical snapshot can be written again without
    /// compressing twice.
    pub async fn save<S: AsRef<str>>(
        &self,
        target: &Target,
        kind: SnapshotKind,
        ids: impl IntoIterator<Item = std::io::Result<S>>,
    ) -> Result<Encoded, Error> {
        let (compressed, members) = crate::members::encode(ids).map_err(Error::Encode)?;
        let encoded = Encoded {
            compressed,
            members,
        };
        self.save_encoded(target, kind, &encoded).await?;
        Ok(encoded)
    }

    /// Writes already compressed identifiers as a new snapshot of a target,
    /// then deletes the older snapshots.
    pub async fn save_encoded(
        &self,
        target: &Target,
        kind: SnapshotKind,
        encoded: &Encoded,
    ) -> Result<(), Error> {
        let existing = self.list_chunks().await?;
        let sequence = existing.iter().filter_map(|(_, s)| *s).max().unwrap_or(0) + 1;
        let chunks: Vec<&[u8]> = if encoded.compressed.is_empty() {
            vec![&[][..]]
        } else {
            encoded.compressed.chunks(CHUNK_BYTES).collect()
        };
        let target_json = serde_json::to_string(target).expect("a target serializes");
        for (index, chunk) in chunks.iter().enumerate() {
            let mut secret = self.chunk_secret(
                sequence,
                index,
                chunks.len(),
                encoded.members,
                &target_json,
                chunk,
            );
            secret
                .annotations_mut()
                .insert(KIND_ANNOTATION.to_string(), kind.as_str().to_string());
            self.api
                .create(&PostParams::default(), &secret)
                .await
                .map_err(|source| Error::Kube {
                    action: "create",
                    source,
                })?;
        }
        for (name, _) in existing {
            self.delete(&name).await?;
        }
        Ok(())
    }

    /// Deletes every snapshot.
    pub async fn delete_all(&self) -> Result<(), Error> {
        for secret in self.list().await? {
            self.delete(&secret.name_any()).await?;
        }
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(source) => Err(Error::Kube {
                action: "delete",
                source,
            }),
        }
    }

    fn chunk_secret(
        &self,
        sequence: u64,
        index: usize,
        count: usize,
        members: u64,
        target_json: &str,
        chunk: &[u8],
    ) -> Secret {
        // Names stay within the 253 characters of a Secret name, and carry
        // the start of the sync's uid: a sync recreated under the same name
        // must not collide with Secrets of its predecessor that the garbage
        // collector has not removed yet.
        let prefix: String = self.name.chars().take(190).collect();
        let uid: String = self
            .uid
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        let labels = BTreeMap::from([
            (SYNC_UID_LABEL.to_string(), self.uid.clone()),
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        ]);
        let annotations = BTreeMap::from([
            (SEQUENCE_ANNOTATION.to_string(), sequence.to_string()),
            (CHUNK_ANNOTATION.to_string(), index.to_string()),
            (CHUNKS_ANNOTATION.to_string(), count.to_string()),
            (MEMBERS_ANNOTATION.to_string(), members.to_string()),
            (TARGET_ANNOTATION.to_string(), target_json.to_string()),
        ]);
        Secret {
            metadata: ObjectMeta {
                name: Some(format!("{prefix}-members-{uid}-{sequence}-{index}")),
                labels: Some(labels),
                annotations: Some(annotations),
                owner_references: Some(vec![self.owner.clone()]),
                ..ObjectMeta::default()
            },
            type_: Some(SECRET_TYPE.to_string()),
            immutable: Some(true),
            data: Some(BTreeMap::from([(
                DATA_KEY.to_string(),
                ByteString(chunk.to_vec()),
            )])),
            ..Secret::default()
        }
    }
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .meta()
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn sequence_of(secret: &Secret) -> Option<u64> {
    annotation(secret, SEQUENCE_ANNOTATION)?.parse().ok()
}

/// Picks the newest snapshot whose chunks are all present and agree on their
/// count, and joins its chunks.
fn newest_complete(secrets: Vec<Secret>) -> Option<Snapshot> {
    let mut by_sequence: BTreeMap<u64, Vec<Secret>> = BTreeMap::new();
    for secret in secrets {
        if let Some(sequence) = sequence_of(&secret) {
            by_sequence.entry(sequence).or_default().push(secret);
        }
    }
    by_sequence
        .into_iter()
        .rev()
        .find_map(|(sequence, chunks)| assemble(sequence, chunks))
}

fn assemble(sequence: u64, mut chunks: Vec<Secret>) -> Option<Snapshot> {
    let first = chunks.first()?;
    let count: usize = annotation(first, CHUNKS_ANNOTATION)?.parse().ok()?;
    let members: u64 = annotation(first, MEMBERS_ANNOTATION)?.parse().ok()?;
    let target: Target = serde_json::from_str(annotation(first, TARGET_ANNOTATION)?).ok()?;
    let kind = SnapshotKind::parse(annotation(first, KIND_ANNOTATION));
    chunks.sort_by_key(|s| annotation(s, CHUNK_ANNOTATION).and_then(|c| c.parse::<usize>().ok()));
    let indexes: Vec<Option<usize>> = chunks
        .iter()
        .map(|s| annotation(s, CHUNK_ANNOTATION).and_then(|c| c.parse().ok()))
        .collect();
    if indexes != (0..count).map(Some).collect::<Vec<_>>() {
        return None;
    }
    let mut compressed = Vec::new();
    for chunk in &chunks {
        let data = chunk.data.as_ref()?.get(DATA_KEY)?;
        compressed.extend_from_slice(&data.0);
    }
    Some(Snapshot {
        sequence,
        kind,
        target,
        members,
        compressed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::MemberSet;

    fn target() -> Target {
        Target {
            site_code: "abc123xyz0".into(),
            custom_data_index: 4,
            custom_data_name: "VIP".into(),
            match_by: MatchBy::VisitorCode,
            cohort_id: 501,
        }
    }

    fn chunks(
        sequence: u64,
        compressed: &[u8],
        members: u64,
        keep: impl Fn(usize) -> bool,
    ) -> Vec<Secret> {
        let store = MemberStore {
            api: Api::namespaced(fake_client(), "growth"),
            name: "vip".into(),
            uid: "uid-1".into(),
            owner: OwnerReference::default(),
        };
        let json = serde_json::to_string(&target()).unwrap();
        let pieces: Vec<&[u8]> = compressed.chunks(64).collect();
        pieces
            .iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(i, piece)| store.chunk_secret(sequence, i, pieces.len(), members, &json, piece))
            .collect()
    }

    fn fake_client() -> kube::Client {
        // Building an Api needs a client; these tests never send a request.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn ids(snapshot: &Snapshot) -> Vec<String> {
        snapshot.ids().collect::<Result<_, _>>().unwrap()
    }

    #[tokio::test]
    async fn newest_complete_snapshot_wins() {
        let old = MemberSet::from_ids(["a", "b"]);
        let new = MemberSet::from_ids(
            (0..500)
                .map(|i| format!("user-{i}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        );
        let (old_bytes, _) =
            crate::members::encode(old.iter().map(Ok::<_, std::io::Error>)).unwrap();
        let (new_bytes, _) =
            crate::members::encode(new.iter().map(Ok::<_, std::io::Error>)).unwrap();
        let mut secrets = chunks(1, &old_bytes, 2, |_| true);
        secrets.extend(chunks(2, &new_bytes, 500, |_| true));
        let snapshot = newest_complete(secrets).unwrap();
        assert_eq!(snapshot.sequence, 2);
        assert_eq!(snapshot.members, 500);
        assert_eq!(ids(&snapshot).len(), 500);
        assert_eq!(snapshot.target, target());
    }

    #[tokio::test]
    async fn incomplete_newer_snapshot_is_ignored() {
        let old = MemberSet::from_ids(["a", "b"]);
        let new = MemberSet::from_ids(
            (0..500)
                .map(|i| format!("user-{i}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        );
        let (old_bytes, _) =
            crate::members::encode(old.iter().map(Ok::<_, std::io::Error>)).unwrap();
        let (new_bytes, _) =
            crate::members::encode(new.iter().map(Ok::<_, std::io::Error>)).unwrap();
        let mut secrets = chunks(1, &old_bytes, 2, |_| true);
        let partial = chunks(2, &new_bytes, 500, |i| i != 1);
        assert!(partial.len() > 1, "the test needs several chunks");
        secrets.extend(partial);
        let snapshot = newest_complete(secrets).unwrap();
        assert_eq!(snapshot.sequence, 1);
        assert_eq!(ids(&snapshot), ["a", "b"]);
    }

    #[tokio::test]
    async fn no_snapshot_without_secrets() {
        assert!(newest_complete(Vec::new()).is_none());
    }

    #[tokio::test]
    async fn snapshot_kind_reads_back() {
        let (bytes, _) = crate::members::encode(["a", "b"].map(Ok::<_, std::io::Error>)).unwrap();
        let with_kind = |value: Option<&str>| {
            let mut secrets = chunks(1, &bytes, 2, |_| true);
            if let Some(value) = value {
                for secret in &mut secrets {
                    secret
                        .annotations_mut()
                        .insert(KIND_ANNOTATION.into(), value.into());
                }
            }
            newest_complete(secrets).unwrap().kind
        };
        assert_eq!(with_kind(None), SnapshotKind::Exported);
        assert_eq!(
            with_kind(Some(SnapshotKind::Exported.as_str())),
            SnapshotKind::Exported
        );
        assert_eq!(
            with_kind(Some(SnapshotKind::Union.as_str())),
            SnapshotKind::Union
        );
        // An unknown value errs on the safe side: everyone is sent again.
        assert_eq!(with_kind(Some("partial")), SnapshotKind::Union);
    }
}
