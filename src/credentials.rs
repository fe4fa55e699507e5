//! Reads a connection's credentials from the Secrets it references.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::conditions::reasons;
use crate::crd::{KameleoonConnectionSpec, KameleoonCredentialsRef, MixpanelCredentialsRef};
use crate::secret::SecretString;
use crate::{kameleoon, mixpanel};

/// Why credentials cannot be read. Messages name Secrets and keys, never values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Secret does not exist.
    #[error("Secret {namespace}/{name} for the {service} credentials does not exist: create it")]
    SecretNotFound {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// `Mixpanel` or `Kameleoon`.
        service: &'static str,
    },
    /// A key is absent or empty.
    #[error(
        "Secret {namespace}/{name} has no non-empty key {key:?} for the {service} credentials: {hint}"
    )]
    KeyMissing {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Missing key.
        key: String,
        /// `Mixpanel` or `Kameleoon`.
        service: &'static str,
        /// What to do.
        hint: &'static str,
    },
    /// A value cannot be used.
    #[error("Secret {namespace}/{name} key {key:?} is invalid: {why}")]
    Invalid {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Key.
        key: String,
        /// What is wrong, without the value.
        why: String,
    },
    /// Reading the Secret failed.
    #[error("cannot read Secret {namespace}/{name}")]
    Kube {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Condition reason for the error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::SecretNotFound { .. } => reasons::SECRET_NOT_FOUND,
            Error::KeyMissing { .. } => reasons::SECRET_KEY_MISSING,
            Error::Invalid { .. } => reasons::SECRET_INVALID,
            Error::Kube { .. } => reasons::KUBERNETES_API_ERROR,
        }
    }
}

/// Credentials of both services, and the resource versions of the Secrets
/// they came from (to notice rotation).
#[derive(Clone, Debug)]
pub struct ConnectionCredentials {
    /// Mixpanel service account.
    pub mixpanel: mixpanel::Credentials,
    /// Kameleoon OAuth client.
    pub kameleoon: kameleoon::Credentials,
    /// `metadata.resourceVersion` of the Mixpanel and Kameleoon Secrets.
    pub versions: (String, String),
}

/// Reads both Secrets of a connection.
pub async fn read(
    client: &kube::Client,
    namespace: &str,
    spec: &KameleoonConnectionSpec,
) -> Result<ConnectionCredentials, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mixpanel_ref = &spec.mixpanel.credentials_secret_ref;
    let kameleoon_ref = &spec.kameleoon.credentials_secret_ref;
    let mixpanel_secret = get(&api, namespace, &mixpanel_ref.name, "Mixpanel").await?;
    let kameleoon_secret = get(&api, namespace, &kameleoon_ref.name, "Kameleoon").await?;
    Ok(ConnectionCredentials {
        mixpanel: mixpanel_credentials(namespace, mixpanel_ref, &mixpanel_secret)?,
        kameleoon: kameleoon_credentials(namespace, kameleoon_ref, &kameleoon_secret)?,
        versions: (
            mixpanel_secret
                .metadata
                .resource_version
                .unwrap_or_default(),
            kameleoon_secret
                .metadata
                .resource_version
                .unwrap_or_default(),
        ),
    })
}

async fn get(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    service: &'static str,
) -> Result<Secret, Error> {
    match api.get_opt(name).await {
        Ok(Some(secret)) => Ok(secret),
        Ok(None) => Err(Error::SecretNotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
            service,
        }),
        Err(source) => Err(Error::Kube {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        }),
    }
}

/// Returns a key's value as text; `None` when the key is absent or holds only
/// whitespace. Surrounding whitespace, such as the newline `echo` leaves, is
/// trimmed.
fn value(secret: &Secret, key: &str) -> Option<String> {
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned());
    let from_string_data = || {
        secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(key))
            .cloned()
    };
    from_data
        .or_else(from_string_data)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn mixpanel_credentials(
    namespace: &str,
    reference: &MixpanelCredentialsRef,
    secret: &Secret,
) -> Result<mixpanel::Credentials, Error> {
    let missing = |key: &str| Error::KeyMissing {
        namespace: namespace.to_string(),
        name: reference.name.clone(),
        key: key.to_string(),
        service: "Mixpanel",
        hint: "add the service account's username and secret, or set usernameKey and secretKey \
               in spec.mixpanel.credentialsSecretRef",
    };
    let username =
        value(secret, reference.username_key()).ok_or_else(|| missing(reference.username_key()))?;
    let password =
        value(secret, reference.secret_key()).ok_or_else(|| missing(reference.secret_key()))?;
    Ok(mixpanel::Credentials {
        username,
        secret: SecretString::new(password),
    })
}

fn kameleoon_credentials(
    namespace: &str,
    reference: &KameleoonCredentialsRef,
    secret: &Secret,
) -> Result<kameleoon::Credentials, Error> {
    let missing = |key: &str| Error::KeyMissing {
        namespace: namespace.to_string(),
        name: reference.name.clone(),
        key: key.to_string(),
        service: "Kameleoon",
        hint: "add clientId and clientSecret (or a single apiKey), or set the key names in \
               spec.kameleoon.credentialsSecretRef",
    };
    if let Some(client_id) = value(secret, reference.client_id_key()) {
        let client_secret = value(secret, reference.client_secret_key())
            .ok_or_else(|| missing(reference.client_secret_key()))?;
        return Ok(kameleoon::Credentials {
            client_id,
            client_secret: SecretString::new(client_secret),
        });
    }
    match value(secret, reference.api_key_key()) {
        Some(api_key) => {
            kameleoon::Credentials::from_api_key(&api_key).map_err(|why| Error::Invalid {
                namespace: namespace.to_string(),
                name: reference.name.clone(),
                key: reference.api_key_key().to_string(),
                why,
            })
        }
        None => Err(missing(reference.client_id_key())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Secret::default()
        }
    }

    fn kameleoon_ref() -> KameleoonCredentialsRef {
        KameleoonCredentialsRef {
            name: "km".into(),
            client_id_key: None,
            client_secret_key: None,
            api_key_key: None,
        }
    }

    fn mixpanel_ref() -> MixpanelCredentialsRef {
        MixpanelCredentialsRef {
            name: "mp".into(),
            username_key: None,
            secret_key: None,
        }
    }

    #[test]
    fn mixpanel_reads_default_keys_and_trims() {
        let creds = mixpanel_credentials(
            "ns",
            &mixpanel_ref(),
            &secret(&[("username", "sa\n"), ("secret", " s1 ")]),
        )
        .unwrap();
        assert_eq!(creds.username, "sa");
        assert_eq!(creds.secret.expose(), "s1");
    }

    #[test]
    fn mixpanel_overridden_keys() {
        let mut reference = mixpanel_ref();
        reference.username_key = Some("user".into());
        reference.secret_key = Some("pass".into());
        let creds =
            mixpanel_credentials("ns", &reference, &secret(&[("user", "a"), ("pass", "b")]))
                .unwrap();
        assert_eq!(creds.username, "a");
    }

    #[test]
    fn missing_key_names_key_not_values() {
        let error = mixpanel_credentials(
            "ns",
            &mixpanel_ref(),
            &secret(&[("username", "sa"), ("secret", "  ")]),
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("\"secret\""), "{text}");
        assert!(text.contains("ns/mp"), "{text}");
        assert!(!text.contains("sa\""), "{text}");
        assert_eq!(error.reason(), reasons::SECRET_KEY_MISSING);
    }

    #[test]
    fn kameleoon_client_credentials() {
        let creds = kameleoon_credentials(
            "ns",
            &kameleoon_ref(),
            &secret(&[("clientId", "c"), ("clientSecret", "s")]),
        )
        .unwrap();
        assert_eq!(creds.client_id, "c");
    }

    #[test]
    fn kameleoon_api_key_fallback() {
        let key = base64::engine::general_purpose::STANDARD.encode(r#"{"id":"c2","secret":"s2"}"#);
        let creds =
            kameleoon_credentials("ns", &kameleoon_ref(), &secret(&[("apiKey", &key)])).unwrap();
        assert_eq!(creds.client_id, "c2");
        assert_eq!(creds.client_secret.expose(), "s2");
    }

    #[test]
    fn kameleoon_invalid_api_key_is_reported_without_value() {
        let error = kameleoon_credentials(
            "ns",
            &kameleoon_ref(),
            &secret(&[("apiKey", "zzzz-not-a-key")]),
        )
        .unwrap_err();
        assert_eq!(error.reason(), reasons::SECRET_INVALID);
        assert!(!error.to_string().contains("zzzz-not-a-key"));
    }

    #[test]
    fn kameleoon_client_id_without_secret() {
        let error = kameleoon_credentials("ns", &kameleoon_ref(), &secret(&[("clientId", "c")]))
            .unwrap_err();
        assert!(error.to_string().contains("clientSecret"));
    }

    #[test]
    fn kameleoon_nothing_usable() {
        let error = kameleoon_credentials("ns", &kameleoon_ref(), &secret(&[])).unwrap_err();
        assert!(error.to_string().contains("clientId"));
        assert!(error.to_string().contains("apiKey"));
    }
}
