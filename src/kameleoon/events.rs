//! Data API request bodies: one query-encoded custom data event per line,
//! packed into as few requests as the body size limit allows.

use std::fmt::Write as _;

use rand::RngExt as _;

use crate::crd::MatchBy;

/// Largest request body sent to the Data API, in bytes. Kameleoon's documents
/// give limits from 1 MB to 10 MB and its SDKs stop at 2.5 Mi characters, so
/// the smallest, 1 MiB, is used.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Formats one event setting the cohort's Boolean custom data for a user.
pub fn line(index: i64, member: bool, id: &str, match_by: MatchBy, nonce: &str) -> String {
    let values = if member {
        "%7B%22true%22%3A1%7D"
    } else {
        "%7B%22false%22%3A1%7D"
    };
    let key = match match_by {
        MatchBy::VisitorCode => "visitorCode",
        MatchBy::MappingIdentifier => "mappingValue",
    };
    let mut out = String::with_capacity(128 + id.len() * 3);
    write!(
        out,
        "eventType=customData&index={index}&valuesCountMap={values}&overwrite=true&nonce={nonce}&{key}="
    )
    .expect("writing to a String cannot fail");
    out.extend(form_urlencoded::byte_serialize(id.as_bytes()));
    out
}

/// Length in bytes of the line [`line`] formats, computed without formatting it.
pub fn line_len(index: i64, member: bool, id: &str, match_by: MatchBy) -> usize {
    let fixed =
        "eventType=customData&index=&valuesCountMap=&overwrite=true&nonce=0123456789ABCDEF&=".len();
    let values = if member { 20 } else { 21 };
    let key = match match_by {
        MatchBy::VisitorCode => "visitorCode".len(),
        MatchBy::MappingIdentifier => "mappingValue".len(),
    };
    let encoded: usize = form_urlencoded::byte_serialize(id.as_bytes())
        .map(str::len)
        .sum();
    fixed + index.to_string().len() + values + key + encoded
}

/// Returns 16 random upper-case hexadecimal characters, the nonce form the
/// Kameleoon SDKs send so the service can drop a repeated event.
pub fn nonce() -> String {
    let value: u64 = rand::rng().random();
    format!("{value:016X}")
}

/// Packs lines into request bodies no larger than a byte limit.
pub struct BatchWriter {
    index: i64,
    match_by: MatchBy,
    max_bytes: usize,
    body: String,
    lines: usize,
}

/// A request body ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Lines joined by `\n`.
    pub body: String,
    /// Number of events in the body.
    pub lines: usize,
}

impl BatchWriter {
    /// Starts an empty writer for one custom data.
    pub fn new(index: i64, match_by: MatchBy, max_bytes: usize) -> Self {
        Self {
            index,
            match_by,
            max_bytes,
            body: String::new(),
            lines: 0,
        }
    }

    /// Adds an event; returns the previous body when this event did not fit in it.
    pub fn push(&mut self, id: &str, member: bool) -> Option<Batch> {
        let line = line(self.index, member, id, self.match_by, &nonce());
        let needed = if self.lines == 0 {
            line.len()
        } else {
            line.len() + 1
        };
        let full = if self.lines > 0 && self.body.len() + needed > self.max_bytes {
            self.take()
        } else {
            None
        };
        if self.lines > 0 {
            self.body.push('\n');
        }
        self.body.push_str(&line);
        self.lines += 1;
        full
    }

    /// Returns the last, partly filled body.
    pub fn finish(mut self) -> Option<Batch> {
        self.take()
    }

    fn take(&mut self) -> Option<Batch> {
        if self.lines == 0 {
            return None;
        }
        let body = std::mem::replace(
            &mut self.body,
            String::with_capacity(self.max_bytes.min(1 << 20)),
        );
        let lines = std::mem::take(&mut self.lines);
        Some(Batch { body, lines })
    }
}

/// Splits a body in two halves at a line boundary, for a service that
/// answered 413 to a body below the operator's own limit.
pub fn split(batch: &Batch) -> Option<(Batch, Batch)> {
    if batch.lines < 2 {
        return None;
    }
    let lines: Vec<&str> = batch.body.split('\n').collect();
    let middle = lines.len() / 2;
    let first = lines[..middle].join("\n");
    let second = lines[middle..].join("\n");
    Some((
        Batch {
            body: first,
            lines: middle,
        },
        Batch {
            body: second,
            lines: lines.len() - middle,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_for_member_by_visitor_code() {
        let text = line(
            3,
            true,
            "user 42/é",
            MatchBy::VisitorCode,
            "0123456789ABCDEF",
        );
        assert_eq!(
            text,
            "eventType=customData&index=3&valuesCountMap=%7B%22true%22%3A1%7D&overwrite=true\
             &nonce=0123456789ABCDEF&visitorCode=user+42%2F%C3%A9"
        );
    }

    #[test]
    fn line_for_leaver_by_mapping_value() {
        let text = line(
            7,
            false,
            "crm-1",
            MatchBy::MappingIdentifier,
            "AAAAAAAAAAAAAAAA",
        );
        assert!(text.contains("valuesCountMap=%7B%22false%22%3A1%7D"));
        assert!(text.ends_with("&mappingValue=crm-1"));
        assert!(!text.contains("visitorCode"));
    }

    #[test]
    fn line_len_matches_formatted_line() {
        for (index, member, id, match_by) in [
            (3, true, "user 42/é", MatchBy::VisitorCode),
            (1234, false, "crm-1", MatchBy::MappingIdentifier),
            (0, true, "x", MatchBy::VisitorCode),
        ] {
            let formatted = line(index, member, id, match_by, &nonce());
            assert_eq!(
                line_len(index, member, id, match_by),
                formatted.len(),
                "{formatted}"
            );
        }
    }

    #[test]
    fn nonce_is_sixteen_upper_hex() {
        let n = nonce();
        assert_eq!(n.len(), 16);
        assert!(
            n.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
        assert_ne!(nonce(), nonce());
    }

    #[test]
    fn batches_fill_up_to_limit_and_never_exceed_it() {
        let one_line = line(1, true, "user-00000", MatchBy::VisitorCode, &nonce()).len();
        // Room for exactly three lines and their two separators.
        let limit = one_line * 3 + 2;
        let mut writer = BatchWriter::new(1, MatchBy::VisitorCode, limit);
        let mut batches = Vec::new();
        for i in 0..10 {
            batches.extend(writer.push(&format!("user-{i:05}"), true));
        }
        batches.extend(writer.finish());
        assert_eq!(
            batches.iter().map(|b| b.lines).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        assert!(batches.iter().all(|b| b.body.len() <= limit));
        assert_eq!(batches[0].body.len(), limit);
        assert_eq!(batches[0].body.matches('\n').count(), 2);
    }

    #[test]
    fn batch_count_meets_lower_bound_on_realistic_sizes() {
        let mut writer = BatchWriter::new(12, MatchBy::VisitorCode, MAX_BODY_BYTES);
        let mut batches = Vec::new();
        let mut total = 0usize;
        for i in 0..50_000 {
            let id = format!("user-{i}-{}", "x".repeat(i % 40));
            total += line(12, true, &id, MatchBy::VisitorCode, "0000000000000000").len() + 1;
            batches.extend(writer.push(&id, true));
        }
        batches.extend(writer.finish());
        let lower_bound = total.div_ceil(MAX_BODY_BYTES);
        assert!(
            batches.len() <= lower_bound + 1,
            "{} batches for bound {lower_bound}",
            batches.len()
        );
        assert_eq!(batches.iter().map(|b| b.lines).sum::<usize>(), 50_000);
        assert!(batches.iter().all(|b| b.body.len() <= MAX_BODY_BYTES));
    }

    #[test]
    fn oversized_single_line_still_sent_alone() {
        let mut writer = BatchWriter::new(1, MatchBy::VisitorCode, 10);
        assert!(writer.push("a", true).is_none());
        let first = writer.push("b", true).expect("first body flushed");
        assert_eq!(first.lines, 1);
        assert_eq!(writer.finish().unwrap().lines, 1);
    }

    #[test]
    fn split_halves_at_line_boundary() {
        let batch = Batch {
            body: "a\nb\nc".into(),
            lines: 3,
        };
        let (x, y) = split(&batch).unwrap();
        assert_eq!((x.body.as_str(), x.lines), ("a", 1));
        assert_eq!((y.body.as_str(), y.lines), ("b\nc", 2));
        assert!(
            split(&Batch {
                body: "a".into(),
                lines: 1
            })
            .is_none()
        );
    }
}
