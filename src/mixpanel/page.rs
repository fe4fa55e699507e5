//! Engage pages, parsed without copying the identifiers out of the
//! response body.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Error, PAGE_SIZE};

/// The body of one Engage response, parsed on demand so the profiles can
/// borrow their text from it.
#[derive(Clone, Debug)]
pub struct PageBody {
    bytes: bytes::Bytes,
    page: u64,
}

impl PageBody {
    pub(super) fn new(bytes: bytes::Bytes, page: u64) -> Self {
        Self { bytes, page }
    }

    /// Parses the page.
    pub fn parse(&self) -> Result<EngagePage<'_>, Error> {
        serde_json::from_slice(&self.bytes)
            .map_err(|e| Error::Decode(format!("engage page {}: {e}", self.page)))
    }
}

/// One page of cohort members.
#[derive(Debug, Deserialize)]
pub struct EngagePage<'a> {
    /// Page number, from 0.
    #[serde(default)]
    pub page: u64,
    /// Largest number of results a page holds.
    #[serde(default = "default_page_size")]
    pub page_size: u64,
    /// Session that the following pages must name.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Profiles matched by the query; Mixpanel sends it on the first page only.
    #[serde(default)]
    pub total: Option<u64>,
    /// Profiles of the page.
    #[serde(default, borrow)]
    pub results: Vec<Profile<'a>>,
}

fn default_page_size() -> u64 {
    PAGE_SIZE
}

/// A profile as the Engage API returns it.
#[derive(Debug, Deserialize)]
pub struct Profile<'a> {
    /// Distinct id: a string, though the API reference types it as a number.
    #[serde(rename = "$distinct_id", default, borrow)]
    pub distinct_id: Scalar<'a>,
    /// The properties asked for.
    #[serde(rename = "$properties", default, borrow)]
    pub properties: Option<Properties<'a>>,
}

/// The profile properties the operator reads; others are skipped while
/// parsing, without being stored.
#[derive(Debug, Default, Deserialize)]
pub struct Properties<'a> {
    /// `$kameleoon_mapping_id`, of whatever JSON type the project stores.
    #[serde(rename = "$kameleoon_mapping_id", default, borrow)]
    pub mapping_id: Option<Scalar<'a>>,
}

/// A JSON value reduced to what identifiers need: the text of a string, the
/// decimal form of a number, or nothing for any other type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scalar<'a> {
    /// A JSON string, borrowed from the body unless it held escapes.
    Text(Cow<'a, str>),
    /// A JSON number, written in decimal.
    Number(String),
    /// `null`, a Boolean, an array or an object, or no value at all.
    #[default]
    Other,
}

impl<'a> Scalar<'a> {
    /// The value as text, when it is a string or a number.
    pub fn text(&self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Text(text) => Some(text.clone()),
            Scalar::Number(number) => Some(Cow::Owned(number.clone())),
            Scalar::Other => None,
        }
    }

    /// The value when it is a JSON string.
    pub fn string(&self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Text(text) => Some(text.clone()),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Borrowed(value)))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(value.to_string())))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(value)))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(value.to_string()))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(value.to_string()))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(
            serde_json::Number::from_f64(value)
                .map_or_else(|| value.to_string(), |n| n.to_string()),
        ))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &'static str) -> EngagePage<'static> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn identifiers_are_borrowed_from_the_body() {
        let page = parse(
            r#"{"results": [{"$distinct_id": "u-1", "$properties": {"$kameleoon_mapping_id": "crm-1", "$email": "x"}}]}"#,
        );
        let profile = &page.results[0];
        assert!(matches!(
            profile.distinct_id,
            Scalar::Text(Cow::Borrowed("u-1"))
        ));
        let mapping = profile
            .properties
            .as_ref()
            .unwrap()
            .mapping_id
            .as_ref()
            .unwrap();
        assert!(matches!(mapping, Scalar::Text(Cow::Borrowed("crm-1"))));
    }

    #[test]
    fn escaped_strings_are_owned() {
        let page = parse(r#"{"results": [{"$distinct_id": "u-\u00e9"}]}"#);
        assert_eq!(page.results[0].distinct_id.text().as_deref(), Some("u-é"));
    }

    #[test]
    fn numbers_become_decimal_text() {
        let page = parse(
            r#"{"results": [{"$distinct_id": 4242}, {"$distinct_id": -7}, {"$distinct_id": 1.5}]}"#,
        );
        let texts: Vec<_> = page
            .results
            .iter()
            .map(|p| p.distinct_id.text().unwrap().into_owned())
            .collect();
        assert_eq!(texts, ["4242", "-7", "1.5"]);
    }

    #[test]
    fn other_types_carry_no_text() {
        let page = parse(
            r#"{"results": [{"$distinct_id": null}, {"$distinct_id": true}, {"$distinct_id": [1]},
                {"$distinct_id": {"a": 1}}, {"$properties": {"$kameleoon_mapping_id": 42}}]}"#,
        );
        for profile in &page.results[..4] {
            assert_eq!(profile.distinct_id, Scalar::Other);
        }
        assert_eq!(page.results[4].distinct_id, Scalar::Other);
        let mapping = page.results[4]
            .properties
            .as_ref()
            .unwrap()
            .mapping_id
            .as_ref()
            .unwrap();
        assert_eq!(mapping.string(), None);
        assert_eq!(mapping.text().as_deref(), Some("42"));
    }

    #[test]
    fn null_mapping_is_absent() {
        let page = parse(
            r#"{"results": [{"$distinct_id": "u", "$properties": {"$kameleoon_mapping_id": null}}]}"#,
        );
        let properties = page.results[0].properties.as_ref().unwrap();
        assert!(
            properties
                .mapping_id
                .as_ref()
                .is_none_or(|m| m.string().is_none())
        );
    }
}
