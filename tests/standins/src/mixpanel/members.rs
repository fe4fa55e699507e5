//! Cohort member lists: explicit members resolved against the project's
//! profiles, or members generated on demand from a deterministic seed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::seed::{DistinctId, GeneratorSeed};

/// Profile property that carries the Kameleoon matching identifier.
pub const MAPPING_ID_PROPERTY: &str = "$kameleoon_mapping_id";

pub(crate) type Properties = Arc<Map<String, Value>>;

/// A member whose profile, if any, has been looked up.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedMember {
    pub distinct_id: DistinctId,
    pub properties: Option<Properties>,
}

/// One member as the stand-in serves it, for tests that compute expectations.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemberView {
    pub distinct_id: DistinctId,
    /// Profile properties; `None` for a member without a profile (anonymous).
    pub properties: Option<Map<String, Value>>,
}

/// A cohort's members at one moment. Engage sessions keep an `Arc` to it, so a
/// cohort replaced mid-read does not change pages already being served.
#[derive(Debug)]
pub(crate) struct MemberList {
    source: MemberSource,
    /// Positions of the members that have a profile, in member order.
    with_profile: Vec<u32>,
}

#[derive(Debug)]
enum MemberSource {
    Explicit(Vec<ResolvedMember>),
    Generated(GeneratorSeed),
}

impl MemberList {
    /// Builds a list from members in order; a repeated distinct id keeps its first entry.
    pub(crate) fn explicit(members: Vec<ResolvedMember>) -> Self {
        let mut seen = HashSet::with_capacity(members.len());
        let members: Vec<ResolvedMember> = members
            .into_iter()
            .filter(|member| seen.insert(member.distinct_id.clone()))
            .collect();
        let with_profile = members
            .iter()
            .enumerate()
            .filter(|(_, member)| member.properties.is_some())
            .map(|(position, _)| position as u32)
            .collect();
        Self {
            source: MemberSource::Explicit(members),
            with_profile,
        }
    }

    pub(crate) fn generated(generator: GeneratorSeed) -> Self {
        let with_profile = (0..generator.count)
            .filter(|&position| !generated_member_traits(&generator, position).anonymous)
            .map(|position| position as u32)
            .collect();
        Self {
            source: MemberSource::Generated(generator),
            with_profile,
        }
    }

    /// Returns the number of members, with or without a profile.
    pub(crate) fn len(&self) -> usize {
        match &self.source {
            MemberSource::Explicit(members) => members.len(),
            MemberSource::Generated(generator) => generator.count as usize,
        }
    }

    /// Returns the number of results a query returns.
    pub(crate) fn matching(&self, include_all_users: bool) -> usize {
        if include_all_users {
            self.len()
        } else {
            self.with_profile.len()
        }
    }

    fn member(&self, position: usize) -> MemberView {
        match &self.source {
            MemberSource::Explicit(members) => {
                let member = &members[position];
                MemberView {
                    distinct_id: member.distinct_id.clone(),
                    properties: member.properties.as_ref().map(|p| (**p).clone()),
                }
            }
            MemberSource::Generated(generator) => generate_member(generator, position as u64),
        }
    }

    /// Returns the `index`-th result of a query, rendered as an Engage result.
    pub(crate) fn engage_result(
        &self,
        include_all_users: bool,
        index: usize,
        output_properties: Option<&[String]>,
    ) -> Option<Value> {
        let position = if include_all_users {
            (index < self.len()).then_some(index)?
        } else {
            *self.with_profile.get(index)? as usize
        };
        let (distinct_id, properties) = match &self.source {
            MemberSource::Explicit(members) => {
                let member = &members[position];
                let properties = member
                    .properties
                    .as_deref()
                    .map(|p| select_properties(p, output_properties))
                    .unwrap_or_default();
                (member.distinct_id.clone(), properties)
            }
            MemberSource::Generated(generator) => {
                let view = generate_member(generator, position as u64);
                let properties = view
                    .properties
                    .map(|p| select_properties(&p, output_properties))
                    .unwrap_or_default();
                (view.distinct_id, properties)
            }
        };
        let mut result = Map::with_capacity(2);
        result.insert(
            "$distinct_id".to_string(),
            serde_json::to_value(&distinct_id).unwrap_or(Value::Null),
        );
        result.insert("$properties".to_string(), Value::Object(properties));
        Some(Value::Object(result))
    }

    /// Returns every member in order.
    pub(crate) fn all(&self) -> Vec<MemberView> {
        (0..self.len())
            .map(|position| self.member(position))
            .collect()
    }
}

fn select_properties(
    properties: &Map<String, Value>,
    output_properties: Option<&[String]>,
) -> Map<String, Value> {
    match output_properties {
        None => properties.clone(),
        Some(names) => names
            .iter()
            .filter_map(|name| {
                properties
                    .get(name)
                    .map(|value| (name.clone(), value.clone()))
            })
            .collect(),
    }
}

/// Resolves member ids against the project's profiles.
pub(crate) fn resolve_members(
    ids: &[DistinctId],
    profiles: &HashMap<DistinctId, Properties>,
) -> Vec<ResolvedMember> {
    ids.iter()
        .map(|id| ResolvedMember {
            distinct_id: id.clone(),
            properties: profiles.get(id).cloned(),
        })
        .collect()
}

/// Per-member draws of a generated cohort.
struct MemberTraits {
    hash: u64,
    anonymous: bool,
    mapping_id: bool,
    long_id: bool,
    non_ascii: bool,
    numeric: bool,
}

/// Mixes 64 bits (SplitMix64 finaliser), so members draw independent values.
fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

/// Returns true with probability `percent` / 100 for the draw `salt` of `hash`.
fn draw(hash: u64, salt: u64, percent: f64) -> bool {
    let basis_points = (percent.clamp(0.0, 100.0) * 100.0).round() as u64;
    mix(hash ^ salt) % 10_000 < basis_points
}

fn generated_member_traits(generator: &GeneratorSeed, position: u64) -> MemberTraits {
    let hash = mix(generator.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ position);
    MemberTraits {
        hash,
        anonymous: draw(hash, 1, generator.percent_anonymous),
        mapping_id: draw(hash, 2, generator.percent_mapping_id),
        long_id: draw(hash, 3, generator.percent_long_ids),
        non_ascii: draw(hash, 4, generator.percent_non_ascii),
        numeric: draw(hash, 5, generator.percent_numeric_ids),
    }
}

/// Builds the generated member at `position` (0-based); ids count from 1.
pub(crate) fn generate_member(generator: &GeneratorSeed, position: u64) -> MemberView {
    let traits = generated_member_traits(generator, position);
    let number = position + 1;
    if traits.anonymous {
        return MemberView {
            distinct_id: DistinctId::Text(format!("$device:{:016x}", traits.hash)),
            properties: None,
        };
    }
    let distinct_id = if traits.numeric {
        DistinctId::Number(1_000_000_000 + number as i64)
    } else {
        let mut text = if traits.non_ascii {
            format!("{}ü-用户-{number:07}", generator.id_prefix)
        } else {
            format!("{}{number:07}", generator.id_prefix)
        };
        if traits.long_id {
            text.push('-');
            let mut filler = traits.hash;
            while text.chars().count() < generator.long_id_length {
                filler = mix(filler);
                text.push_str(&format!("{filler:016x}"));
            }
            let cut = text
                .char_indices()
                .nth(generator.long_id_length)
                .map(|(byte, _)| byte)
                .unwrap_or(text.len());
            text.truncate(cut);
        }
        DistinctId::Text(text)
    };
    let mut properties = Map::new();
    properties.insert(
        "$email".to_string(),
        Value::String(format!("user{number}@example.test")),
    );
    if traits.mapping_id {
        properties.insert(
            MAPPING_ID_PROPERTY.to_string(),
            Value::String(format!("km-{:012x}", traits.hash >> 16)),
        );
    }
    MemberView {
        distinct_id,
        properties: Some(properties),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(count: u64) -> GeneratorSeed {
        GeneratorSeed {
            percent_anonymous: 20.0,
            percent_mapping_id: 30.0,
            percent_long_ids: 5.0,
            long_id_length: 120,
            percent_non_ascii: 5.0,
            ..GeneratorSeed::new(count)
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let first = MemberList::generated(generator(2000)).all();
        let second = MemberList::generated(generator(2000)).all();
        assert_eq!(first, second);
        let other_seed = MemberList::generated(GeneratorSeed {
            seed: 99,
            ..generator(2000)
        })
        .all();
        assert_ne!(first, other_seed);
    }

    #[test]
    fn generated_shares_are_near_requested() {
        let list = MemberList::generated(generator(20_000));
        let members = list.all();
        let anonymous = members.iter().filter(|m| m.properties.is_none()).count();
        let mapped = members
            .iter()
            .filter(|m| {
                m.properties
                    .as_ref()
                    .is_some_and(|p| p.contains_key(MAPPING_ID_PROPERTY))
            })
            .count();
        let long = members
            .iter()
            .filter(|m| m.distinct_id.to_text().chars().count() == 120)
            .count();
        let non_ascii = members
            .iter()
            .filter(|m| !m.distinct_id.to_text().is_ascii())
            .count();
        assert!((3600..4400).contains(&anonymous), "anonymous {anonymous}");
        assert!((4300..5300).contains(&mapped), "mapped {mapped}");
        assert!((600..1000).contains(&long), "long {long}");
        assert!((600..1000).contains(&non_ascii), "non-ascii {non_ascii}");
        assert_eq!(list.matching(false), 20_000 - anonymous);
        assert_eq!(list.matching(true), 20_000);
    }

    #[test]
    fn explicit_list_skips_repeated_ids() {
        let profile: Properties =
            Arc::new(Map::from_iter([("$email".to_string(), Value::from("x"))]));
        let list = MemberList::explicit(vec![
            ResolvedMember {
                distinct_id: "a".into(),
                properties: Some(profile),
            },
            ResolvedMember {
                distinct_id: "b".into(),
                properties: None,
            },
            ResolvedMember {
                distinct_id: "a".into(),
                properties: None,
            },
        ]);
        assert_eq!(list.len(), 2);
        assert_eq!(list.matching(false), 1);
        let result = list.engage_result(true, 1, None).expect("second member");
        assert_eq!(result["$distinct_id"], "b");
        assert_eq!(result["$properties"], serde_json::json!({}));
    }
}
