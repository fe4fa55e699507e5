//! Which identifier, if any, a Mixpanel profile is exported under.
//!
//! Every rule about identifiers lives here, so the limits can be checked and
//! changed in one place:
//!
//! - the identifier is `$kameleoon_mapping_id` when it is a string with at
//!   least one non-whitespace character, otherwise the profile's
//!   `$distinct_id` (a string, or a number written in decimal);
//! - a profile whose identifier is a device id (`$device:` prefix, as
//!   Mixpanel's Simplified ID Merge assigns before a user logs in) is
//!   anonymous, like a member without a profile, whichever property the
//!   identifier came from;
//! - an identifier Kameleoon's Data API would not accept is skipped as
//!   invalid: empty, longer than the limit of the identifier kind, or
//!   containing control characters.

use std::borrow::Cow;

use serde_json::Value;

use crate::crd::MatchBy;

/// Profile property that carries the identifier Kameleoon knows the user by.
pub const MAPPING_PROPERTY: &str = "$kameleoon_mapping_id";

/// Prefix of the distinct ids Mixpanel gives devices that never identified.
pub const DEVICE_ID_PREFIX: &str = "$device:";

/// Longest `visitorCode` the Kameleoon Data API reference accepts, in characters.
pub const MAX_VISITOR_CODE_CHARS: usize = 100;

/// Longest `mappingValue` sent, in characters. The Kameleoon SDKs reject
/// identifiers above 255 characters; the Data API reference gives no limit for
/// mapping values, so the SDK limit is used.
pub const MAX_MAPPING_VALUE_CHARS: usize = 255;

/// Outcome of the identity rules for one profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity<'a> {
    /// The profile is exported under this identifier.
    Member(Cow<'a, str>),
    /// The profile cannot be matched to a known user.
    Anonymous,
    /// The identifier would be rejected by Kameleoon.
    Invalid(InvalidIdentifier),
}

/// Why an identifier is skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvalidIdentifier {
    /// No identifier, or one made of whitespace only.
    Empty,
    /// More characters than the identifier kind allows.
    TooLong,
    /// A control character such as a line break.
    ControlCharacter,
    /// `$distinct_id` is neither a string nor a number.
    NotAString,
}

impl InvalidIdentifier {
    /// Event reason that reports skipped identifiers of this kind.
    pub fn reason(self) -> &'static str {
        match self {
            InvalidIdentifier::Empty => "IdentifierEmpty",
            InvalidIdentifier::TooLong => "IdentifierTooLong",
            InvalidIdentifier::ControlCharacter => "IdentifierHasControlCharacter",
            InvalidIdentifier::NotAString => "IdentifierNotAString",
        }
    }

    /// Describes the rule in words, for Event notes.
    pub fn describe(self, match_by: MatchBy) -> String {
        match self {
            InvalidIdentifier::Empty => "the identifier is empty".to_string(),
            InvalidIdentifier::TooLong => format!(
                "the identifier is longer than the {} characters Kameleoon accepts for a {}",
                max_chars(match_by),
                match match_by {
                    MatchBy::VisitorCode => "visitor code",
                    MatchBy::MappingIdentifier => "mapping value",
                }
            ),
            InvalidIdentifier::ControlCharacter => {
                "the identifier contains a control character".to_string()
            }
            InvalidIdentifier::NotAString => {
                "$distinct_id is neither a string nor a number".to_string()
            }
        }
    }
}

/// Longest identifier, in characters, for the identifier kind.
pub fn max_chars(match_by: MatchBy) -> usize {
    match match_by {
        MatchBy::VisitorCode => MAX_VISITOR_CODE_CHARS,
        MatchBy::MappingIdentifier => MAX_MAPPING_VALUE_CHARS,
    }
}

/// Applies the identity rules to one profile of the Engage API, given as
/// JSON values.
pub fn resolve(
    distinct_id: &Value,
    properties: Option<&Value>,
    match_by: MatchBy,
) -> Identity<'static> {
    let distinct = match distinct_id {
        Value::String(s) => Some(Cow::Owned(s.clone())),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        _ => None,
    };
    let mapping = properties
        .and_then(|p| p.get(MAPPING_PROPERTY))
        .and_then(Value::as_str)
        .map(|m| Cow::Owned(m.to_string()));
    resolve_text(distinct, mapping, match_by)
}

/// Applies the identity rules to a profile's distinct id (as text, `None`
/// when it is neither a string nor a number) and its
/// `$kameleoon_mapping_id` (`None` when absent or not a string). The chosen
/// identifier is borrowed, not copied, when it is valid.
pub fn resolve_text<'a>(
    distinct_id: Option<Cow<'a, str>>,
    mapping_id: Option<Cow<'a, str>>,
    match_by: MatchBy,
) -> Identity<'a> {
    let mapping = mapping_id.filter(|s| !s.trim().is_empty());
    let Some(id) = mapping.or(distinct_id) else {
        return Identity::Invalid(InvalidIdentifier::NotAString);
    };
    if id.starts_with(DEVICE_ID_PREFIX) {
        return Identity::Anonymous;
    }
    validate(id, match_by)
}

fn validate(id: Cow<'_, str>, match_by: MatchBy) -> Identity<'_> {
    if id.trim().is_empty() {
        return Identity::Invalid(InvalidIdentifier::Empty);
    }
    let mut chars = 0;
    for c in id.chars() {
        if c.is_control() {
            return Identity::Invalid(InvalidIdentifier::ControlCharacter);
        }
        chars += 1;
    }
    if chars > max_chars(match_by) {
        return Identity::Invalid(InvalidIdentifier::TooLong);
    }
    Identity::Member(id)
}

/// Shortens an identifier for messages, so that Events and logs never carry a
/// whole overlong identifier.
pub fn abbreviate(id: &str) -> String {
    const KEEP: usize = 12;
    if id.chars().count() <= KEEP {
        return id.to_string();
    }
    let head: String = id.chars().take(KEEP).collect();
    format!("{head}… ({} characters)", id.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use InvalidIdentifier::*;
    use MatchBy::*;

    fn member(id: &str) -> Identity<'static> {
        Identity::Member(Cow::Owned(id.to_string()))
    }

    #[test]
    fn identity_rules_table() {
        let long_ascii = |n: usize| "a".repeat(n);
        let cases: Vec<(&str, Value, Value, MatchBy, Identity)> = vec![
            (
                "plain distinct id",
                json!("u-1"),
                json!({"$email": "x@ex.test"}),
                VisitorCode,
                member("u-1"),
            ),
            (
                "mapping id wins",
                json!("u-1"),
                json!({MAPPING_PROPERTY: "crm-7"}),
                VisitorCode,
                member("crm-7"),
            ),
            (
                "empty mapping falls back",
                json!("u-map"),
                json!({MAPPING_PROPERTY: ""}),
                VisitorCode,
                member("u-map"),
            ),
            (
                "blank mapping falls back",
                json!("u-map"),
                json!({MAPPING_PROPERTY: "  "}),
                VisitorCode,
                member("u-map"),
            ),
            (
                "numeric mapping ignored",
                json!("u-2"),
                json!({MAPPING_PROPERTY: 42}),
                VisitorCode,
                member("u-2"),
            ),
            (
                "null mapping ignored",
                json!("u-3"),
                json!({MAPPING_PROPERTY: null}),
                VisitorCode,
                member("u-3"),
            ),
            (
                "numeric distinct id",
                json!(4815),
                json!({}),
                VisitorCode,
                member("4815"),
            ),
            (
                "no properties",
                json!("u-4"),
                Value::Null,
                VisitorCode,
                member("u-4"),
            ),
            (
                "device id is anonymous",
                json!("$device:7f3a-11"),
                json!({}),
                VisitorCode,
                Identity::Anonymous,
            ),
            (
                "device id with mapping",
                json!("$device:9c"),
                json!({MAPPING_PROPERTY: "crm-77"}),
                VisitorCode,
                member("crm-77"),
            ),
            (
                "empty distinct id",
                json!(""),
                json!({}),
                VisitorCode,
                Identity::Invalid(Empty),
            ),
            (
                "blank distinct id",
                json!("   "),
                json!({}),
                VisitorCode,
                Identity::Invalid(Empty),
            ),
            (
                "boolean distinct id",
                json!(true),
                json!({}),
                VisitorCode,
                Identity::Invalid(NotAString),
            ),
            (
                "null distinct id",
                Value::Null,
                json!({}),
                VisitorCode,
                Identity::Invalid(NotAString),
            ),
            (
                "line break",
                json!("u-1\nu-2"),
                json!({}),
                VisitorCode,
                Identity::Invalid(ControlCharacter),
            ),
            (
                "tab",
                json!("u\t1"),
                json!({}),
                VisitorCode,
                Identity::Invalid(ControlCharacter),
            ),
            (
                "visitor code at limit",
                json!(long_ascii(100)),
                json!({}),
                VisitorCode,
                member(&long_ascii(100)),
            ),
            (
                "visitor code over limit",
                json!(long_ascii(101)),
                json!({}),
                VisitorCode,
                Identity::Invalid(TooLong),
            ),
            (
                "mapping value at limit",
                json!(long_ascii(255)),
                json!({}),
                MappingIdentifier,
                member(&long_ascii(255)),
            ),
            (
                "mapping value over limit",
                json!(long_ascii(256)),
                json!({}),
                MappingIdentifier,
                Identity::Invalid(TooLong),
            ),
            (
                "overlong mapping id skipped",
                json!("u-5"),
                json!({MAPPING_PROPERTY: long_ascii(101)}),
                VisitorCode,
                Identity::Invalid(TooLong),
            ),
            (
                "non-ASCII counted in characters",
                json!("é".repeat(100)),
                json!({}),
                VisitorCode,
                member(&"é".repeat(100)),
            ),
            (
                "non-ASCII over limit",
                json!("é".repeat(101)),
                json!({}),
                VisitorCode,
                Identity::Invalid(TooLong),
            ),
            (
                "255-character visitor code over limit",
                json!(long_ascii(255)),
                json!({"$email": "x@ex.test"}),
                VisitorCode,
                Identity::Invalid(TooLong),
            ),
            (
                "256-character visitor code over limit",
                json!("b".repeat(256)),
                json!({"$email": "y@ex.test"}),
                VisitorCode,
                Identity::Invalid(TooLong),
            ),
            (
                "256-character mapping value over limit",
                json!("b".repeat(256)),
                json!({"$email": "y@ex.test"}),
                MappingIdentifier,
                Identity::Invalid(TooLong),
            ),
            (
                "mapping id at mapping limit",
                json!("u-7"),
                json!({MAPPING_PROPERTY: long_ascii(255)}),
                MappingIdentifier,
                member(&long_ascii(255)),
            ),
            (
                "empty mapping falls back under mapping identifier",
                json!("u-map"),
                json!({MAPPING_PROPERTY: ""}),
                MappingIdentifier,
                member("u-map"),
            ),
            (
                "overlong mapping id does not fall back",
                json!("u-8"),
                json!({MAPPING_PROPERTY: "m".repeat(256)}),
                MappingIdentifier,
                Identity::Invalid(TooLong),
            ),
            (
                "mapping id with line break does not fall back",
                json!("u-9"),
                json!({MAPPING_PROPERTY: "crm\n9"}),
                VisitorCode,
                Identity::Invalid(ControlCharacter),
            ),
            (
                "device id with properties is anonymous",
                json!("$device:7f3a-11"),
                json!({"$browser": "Chrome"}),
                VisitorCode,
                Identity::Anonymous,
            ),
            (
                "device id with empty mapping is anonymous",
                json!("$device:7f3a-12"),
                json!({MAPPING_PROPERTY: ""}),
                MappingIdentifier,
                Identity::Anonymous,
            ),
            (
                "device id as mapping id is anonymous",
                json!("user-43"),
                json!({MAPPING_PROPERTY: "$device:9c2b-78"}),
                VisitorCode,
                Identity::Anonymous,
            ),
            (
                "user id profile",
                json!("user-42"),
                json!({"$user_id": "user-42"}),
                VisitorCode,
                member("user-42"),
            ),
            (
                "delete character",
                json!("u\u{7f}1"),
                json!({}),
                VisitorCode,
                Identity::Invalid(ControlCharacter),
            ),
            (
                "spaces kept inside",
                json!(" u 6 "),
                json!({}),
                VisitorCode,
                member(" u 6 "),
            ),
        ];
        for (name, distinct, properties, match_by, expected) in cases {
            let props = if properties.is_null() {
                None
            } else {
                Some(&properties)
            };
            assert_eq!(
                resolve(&distinct, props, match_by),
                expected,
                "case: {name}"
            );
        }
    }

    #[test]
    fn abbreviate_keeps_short_ids() {
        assert_eq!(abbreviate("u-1"), "u-1");
    }

    #[test]
    fn abbreviate_cuts_long_ids() {
        let text = abbreviate(&"b".repeat(256));
        assert!(text.starts_with("bbbbbbbbbbbb…"));
        assert!(text.ends_with("(256 characters)"));
    }

    #[test]
    fn every_invalid_kind_has_reason() {
        for kind in [Empty, TooLong, ControlCharacter, NotAString] {
            assert!(kind.reason().starts_with("Identifier"));
            assert!(!kind.describe(VisitorCode).is_empty());
        }
    }
}
