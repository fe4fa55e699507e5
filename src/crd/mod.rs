//! Custom resource types of the `cohortsync.io` API group.
//!
//! The types carry no client code: controllers read and write them, and the
//! `crds` command prints the CustomResourceDefinitions generated from them.

// Several `printcolumn(...)` entries repeat keys such as `type_`, which the
// lint reads as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod cohort_sync;
mod connection;

pub use cohort_sync::*;
pub use connection::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every resource of this operator.
pub const GROUP: &str = "cohortsync.io";

/// Category that `kubectl get cohortsync-all` lists.
pub const CATEGORY: &str = "cohortsync";

/// Reference to an object in the same namespace, by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the object, in the namespace of the referring resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Returns the CustomResourceDefinitions of both kinds, in a stable order.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![
        unwrap_descriptions(KameleoonConnection::crd()),
        unwrap_descriptions(CohortSync::crd()),
    ]
}

/// Joins the lines of every schema description into paragraphs, so that
/// `kubectl explain` wraps the text itself instead of keeping the line breaks
/// of the Rust doc comments.
fn unwrap_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(text) if key == "description" => {
                            *text = text
                                .split("\n\n")
                                .map(|paragraph| {
                                    paragraph.split('\n').collect::<Vec<_>>().join(" ")
                                })
                                .collect::<Vec<_>>()
                                .join("\n\n");
                        }
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serializes to JSON");
    walk(&mut value);
    serde_json::from_value(value).expect("a CRD with changed descriptions deserializes")
}

/// Renders each CustomResourceDefinition as the file `crds/` holds for it:
/// `<group>_<plural>.yaml`.
pub fn definition_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    definitions()
        .into_iter()
        .map(|crd| {
            let name = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
            serde_yaml::to_string(&crd).map(|yaml| (name, yaml))
        })
        .collect()
}

/// Renders the CustomResourceDefinitions as one multi-document YAML stream.
pub fn definitions_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in definitions() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
