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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// A CEL rule of a schema, with the path of the property it sits on.
    struct Rule {
        path: String,
        rule: String,
        has_message: bool,
        field_path: Option<String>,
    }

    fn collect(schema: &Value, path: &str, out: &mut Vec<Rule>) {
        if let Some(rules) = schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            for rule in rules {
                out.push(Rule {
                    path: path.to_string(),
                    rule: rule["rule"].as_str().unwrap_or_default().to_string(),
                    has_message: rule.get("message").is_some()
                        || rule.get("messageExpression").is_some(),
                    field_path: rule
                        .get("fieldPath")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                });
            }
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (name, child) in properties {
                let child_path = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                collect(child, &child_path, out);
            }
        }
        if let Some(items) = schema.get("items") {
            collect(items, &format!("{path}[]"), out);
        }
    }

    fn rules() -> Vec<(String, Rule)> {
        let mut all = Vec::new();
        for crd in definitions() {
            let kind = crd.spec.names.kind.clone();
            for version in &crd.spec.versions {
                let schema = serde_json::to_value(&version.schema).unwrap();
                let mut found = Vec::new();
                collect(&schema["openAPIV3Schema"], "", &mut found);
                all.extend(found.into_iter().map(|rule| (kind.clone(), rule)));
            }
        }
        all
    }

    #[test]
    fn every_rule_has_a_message() {
        let all = rules();
        assert!(!all.is_empty());
        for (kind, rule) in &all {
            assert!(
                rule.has_message,
                "{kind} {}: rule {:?} has no message",
                rule.path, rule.rule
            );
        }
    }

    /// A rule that uses `oldSelf` is a transition rule: the API server skips
    /// it on create, so it must never be the only check of an invariant that
    /// also holds for new objects. Each one is listed here on purpose.
    #[test]
    fn only_listed_rules_compare_with_old_object() {
        let transition: Vec<(String, String, String)> = rules()
            .into_iter()
            .filter(|(_, rule)| rule.rule.contains("oldSelf"))
            .map(|(kind, rule)| (kind, rule.path, rule.rule))
            .collect();
        assert_eq!(
            transition,
            [(
                "CohortSync".to_string(),
                "spec.connectionRef".to_string(),
                "self == oldSelf".to_string()
            )]
        );
    }

    /// A rule on an object that checks one of its fields names that field,
    /// so the API server's error points at it rather than at the object.
    #[test]
    fn spec_level_rules_point_at_a_field() {
        for (kind, rule) in rules() {
            if rule.path == "spec" {
                assert!(
                    rule.field_path.is_some(),
                    "{kind} spec rule {:?} has no fieldPath",
                    rule.rule
                );
            }
        }
    }
}
