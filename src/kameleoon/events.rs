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
    let mut out = String::with_capacity(128 + id.len() * 3);
    write_line(&mut out, index, member, id, match_by, Some(nonce));
    out
}

/// Appends the line [`line`] formats to `out`, without allocating; without a
/// `nonce`, a random one is written.
fn write_line(
    out: &mut String,
    index: i64,
    member: bool,
    id: &str,
    match_by: MatchBy,
    nonce: Option<&str>,
) {
    let values = if member {
        "%7B%22true%22%3A1%7D"
    } else {
        "%7B%22false%22%3A1%7D"
    };
    let key = match match_by {
        MatchBy::VisitorCode => "visitorCode",
        MatchBy::MappingIdentifier => "mappingValue",
    };
    out.push_str("eventType=customData&index=");
    write!(out, "{index}").expect("writing to a String cannot fail");
    out.push_str("&valuesCountMap=");
    out.push_str(values);
    out.push_str("&overwrite=true&nonce=");
    match nonce {
        Some(nonce) => out.push_str(nonce),
        None => push_nonce(out),
    }
    out.push('&');
    out.push_str(key);
    out.push('=');
    encode_value(out, id);
}

/// Appends a form-encoded value: characters that need no escaping are copied
/// as they are, which covers most identifiers.
fn encode_value(out: &mut String, value: &str) {
    if value.bytes().all(is_plain) {
        out.push_str(value);
    } else {
        out.extend(form_urlencoded::byte_serialize(value.as_bytes()));
    }
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
    let digits = index
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d as usize + 1);
    let sign = usize::from(index < 0);
    fixed + sign + digits + values + key + encoded_len(id)
}

/// Length of a form-encoded value, with the same fast path as [`encode_value`].
fn encoded_len(value: &str) -> usize {
    if value.bytes().all(is_plain) {
        value.len()
    } else {
        form_urlencoded::byte_serialize(value.as_bytes())
            .map(str::len)
            .sum()
    }
}

/// Whether a byte passes form encoding unchanged.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'*')
}

/// Returns 16 random upper-case hexadecimal characters, the nonce form the
/// Kameleoon SDKs send so the service can drop a repeated event.
pub fn nonce() -> String {
    let mut out = String::with_capacity(16);
    push_nonce(&mut out);
    out
}

fn push_nonce(out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let value: u64 = rand::rng().random();
    for shift in (0..16).rev() {
        out.push(char::from(DIGITS[((value >> (shift * 4)) & 0xF) as usize]));
    }
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
    /// Lines joined by `\n`; cheap to clone for a retry.
    pub body: bytes::Bytes,
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
        // The line is written in place and moved to the next body only in
        // the rare case that it does not fit, so each line is formatted once.
        let mark = self.body.len();
        if self.lines > 0 {
            self.body.push('\n');
        }
        write_line(&mut self.body, self.index, member, id, self.match_by, None);
        self.lines += 1;
        if self.lines == 1 || self.body.len() <= self.max_bytes {
            return None;
        }
        let line = self.body[mark + 1..].to_string();
        self.body.truncate(mark);
        self.lines -= 1;
        let full = self.take();
        self.body.push_str(&line);
        self.lines = 1;
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
        // The next body grows as lines arrive: a small export should not
        // hold a buffer of the full body size.
        let body = bytes::Bytes::from(std::mem::take(&mut self.body));
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
    let lines: Vec<&[u8]> = batch.body.split(|b| *b == b'\n').collect();
    let middle = lines.len() / 2;
    let first = lines[..middle].join(&b'\n');
    let second = lines[middle..].join(&b'\n');
    Some((
        Batch {
            body: first.into(),
            lines: middle,
        },
        Batch {
            body: second.into(),
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
            (-7, true, "plain-id_1.2*", MatchBy::VisitorCode),
            (100, false, "ü-用户 +&=", MatchBy::MappingIdentifier),
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
        assert_eq!(batches[0].body.iter().filter(|b| **b == b'\n').count(), 2);
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
        assert_eq!((&x.body[..], x.lines), (&b"a"[..], 1));
        assert_eq!((&y.body[..], y.lines), (&b"b\nc"[..], 2));
        assert!(
            split(&Batch {
                body: "a".into(),
                lines: 1
            })
            .is_none()
        );
    }
}
