//! Compact, sorted sets of member identifiers, their differences, and the
//! compressed form they are stored in.
//!
//! A cohort can hold millions of members, so identifiers are kept in one
//! byte buffer with an index of spans instead of one `String` each, and the
//! previous export is streamed from its compressed form instead of being
//! decoded into a second set.

use std::cmp::Ordering;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

/// Collects identifiers as they are read; [`MemberSetBuilder::finish`] sorts
/// them and drops duplicates.
#[derive(Default)]
pub struct MemberSetBuilder {
    text: String,
    spans: Vec<Span>,
}

#[derive(Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
}

/// Sorted identifiers without duplicates.
#[derive(Default)]
pub struct MemberSet {
    text: String,
    spans: Vec<Span>,
}

impl MemberSetBuilder {
    /// Adds one identifier. Identifiers never contain a line break: the
    /// identity rules skip control characters.
    pub fn push(&mut self, id: &str) {
        let start = u32::try_from(self.text.len()).expect("member buffer exceeds 4 GiB");
        let len = u32::try_from(id.len()).expect("identifier exceeds 4 GiB");
        self.text.push_str(id);
        self.spans.push(Span { start, len });
    }

    /// Identifiers pushed so far, duplicates included.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Returns whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Sorts the identifiers and removes duplicates; returns the set and the
    /// number of duplicates removed.
    pub fn finish(self) -> (MemberSet, u64) {
        let MemberSetBuilder { text, mut spans } = self;
        let slice = |s: &Span| &text.as_bytes()[s.start as usize..(s.start + s.len) as usize];
        spans.sort_unstable_by(|a, b| slice(a).cmp(slice(b)));
        let before = spans.len();
        spans.dedup_by(|a, b| slice(a) == slice(b));
        let duplicates = (before - spans.len()) as u64;
        spans.shrink_to_fit();
        (MemberSet { text, spans }, duplicates)
    }
}

impl MemberSet {
    /// Builds a set from any identifiers, for tests and small inputs.
    pub fn from_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        let mut builder = MemberSetBuilder::default();
        ids.into_iter().for_each(|id| builder.push(id));
        builder.finish().0
    }

    /// Number of identifiers.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Returns whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Iterates the identifiers in byte order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        // Spans start and end where whole identifiers were pushed, so they
        // lie on character boundaries.
        self.spans
            .iter()
            .map(|s| &self.text[s.start as usize..(s.start + s.len) as usize])
    }

    /// Bytes held by the set, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.spans.capacity() * std::mem::size_of::<Span>()
    }
}

/// One identifier's place in an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// A member now that was not exported before.
    Joined(&'a str),
    /// A member now that was exported before.
    Stayed(&'a str),
    /// Exported before, not a member any more.
    Left(String),
}

impl Change<'_> {
    /// The identifier.
    pub fn id(&self) -> &str {
        match self {
            Change::Joined(id) | Change::Stayed(id) => id,
            Change::Left(id) => id,
        }
    }
}

/// Merges the current members with the previously exported identifiers (in
/// byte order, as the store keeps them) into one sorted stream of changes.
pub fn diff<'a, P>(current: &'a MemberSet, previous: P) -> Diff<'a, P::IntoIter>
where
    P: IntoIterator<Item = io::Result<String>>,
{
    Diff {
        current: current.boxed_iter().peekable(),
        previous: previous.into_iter(),
        pending_previous: None,
        last_previous: None,
    }
}

/// Iterator returned by [`diff`].
pub struct Diff<'a, P: Iterator<Item = io::Result<String>>> {
    current: std::iter::Peekable<Box<dyn Iterator<Item = &'a str> + Send + 'a>>,
    previous: P,
    pending_previous: Option<String>,
    last_previous: Option<String>,
}

impl<'a, P: Iterator<Item = io::Result<String>>> Diff<'a, P> {
    fn next_previous(&mut self) -> io::Result<Option<String>> {
        if let Some(id) = self.pending_previous.take() {
            return Ok(Some(id));
        }
        let Some(next) = self.previous.next().transpose()? else {
            return Ok(None);
        };
        if let Some(last) = &self.last_previous
            && last.as_str() >= next.as_str()
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "stored members are not in sorted order",
            ));
        }
        self.last_previous = Some(next.clone());
        Ok(Some(next))
    }
}

impl<'a, P: Iterator<Item = io::Result<String>>> Iterator for Diff<'a, P> {
    type Item = io::Result<Change<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let previous = match self.next_previous() {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let current = self.current.peek().copied();
        let change = match (current, previous) {
            (None, None) => return None,
            (Some(c), None) => {
                self.current.next();
                Change::Joined(c)
            }
            (None, Some(p)) => Change::Left(p),
            (Some(c), Some(p)) => match c.as_bytes().cmp(p.as_bytes()) {
                Ordering::Less => {
                    self.pending_previous = Some(p);
                    self.current.next();
                    Change::Joined(c)
                }
                Ordering::Equal => {
                    self.current.next();
                    Change::Stayed(c)
                }
                Ordering::Greater => Change::Left(p),
            },
        };
        Some(Ok(change))
    }
}

// `Peekable` needs a concrete iterator type; boxing keeps `Diff` nameable.
impl MemberSet {
    fn boxed_iter(&self) -> Box<dyn Iterator<Item = &str> + Send + '_> {
        Box::new(self.iter())
    }
}

/// Size of the blocks the compressor receives.
const ENCODE_BUFFER_BYTES: usize = 64 * 1024;

/// Writes sorted identifiers as gzip-compressed lines, the stored form of an
/// export. Gzip's CRC-32 lets the reader detect a damaged or incomplete copy.
pub fn encode<S: AsRef<str>>(
    ids: impl IntoIterator<Item = io::Result<S>>,
) -> io::Result<(Vec<u8>, u64)> {
    // The fastest level: sorted identifiers share long prefixes, so it still
    // compresses them several times, at a fraction of the default level's CPU.
    // The buffer hands the compressor large blocks: flate2 prepares its
    // output buffer on every write, which would dominate with one write per
    // identifier.
    let mut writer = BufWriter::with_capacity(
        ENCODE_BUFFER_BYTES,
        GzEncoder::new(Vec::new(), Compression::fast()),
    );
    let mut count = 0u64;
    for id in ids {
        writer.write_all(id?.as_ref().as_bytes())?;
        writer.write_all(b"\n")?;
        count += 1;
    }
    let encoder = writer.into_inner().map_err(|e| e.into_error())?;
    Ok((encoder.finish()?, count))
}

/// Reads identifiers back from the stored form, one line each.
pub fn decode<R: Read>(compressed: R) -> impl Iterator<Item = io::Result<String>> {
    BufReader::new(MultiGzDecoder::new(compressed)).lines()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn previous(ids: &[&str]) -> Vec<io::Result<String>> {
        ids.iter().map(|s| Ok(s.to_string())).collect()
    }

    fn changes(current: &MemberSet, before: &[&str]) -> Vec<String> {
        diff(current, previous(before))
            .map(|c| match c.unwrap() {
                Change::Joined(id) => format!("+{id}"),
                Change::Stayed(id) => format!("={id}"),
                Change::Left(id) => format!("-{id}"),
            })
            .collect()
    }

    #[test]
    fn builder_sorts_and_counts_duplicates() {
        let mut builder = MemberSetBuilder::default();
        for id in ["u-3", "u-1", "u-3", "u-2", "u-1"] {
            builder.push(id);
        }
        let (set, duplicates) = builder.finish();
        assert_eq!(set.iter().collect::<Vec<_>>(), ["u-1", "u-2", "u-3"]);
        assert_eq!(duplicates, 2);
    }

    #[test]
    fn sort_matches_byte_order_past_sixteen_bytes() {
        let ids = [
            "user-000000000000000002",
            "user-0000000000000000",
            "user-000000000000000001",
            "user-00000000000000",
            "usér-1",
            "u",
            "user-0000000000000000\u{1}",
            "zz",
            "user-000000000000000001",
        ];
        let set = MemberSet::from_ids(ids);
        let mut expected: Vec<&str> = ids.to_vec();
        expected.sort();
        expected.dedup();
        assert_eq!(set.iter().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn diff_reports_joined_stayed_left() {
        let now = MemberSet::from_ids(["u-2", "u-4"]);
        assert_eq!(
            changes(&now, &["u-1", "u-2", "u-3"]),
            ["-u-1", "=u-2", "-u-3", "+u-4"]
        );
    }

    #[test]
    fn diff_of_empty_previous_is_all_joined() {
        let now = MemberSet::from_ids(["b", "a"]);
        assert_eq!(changes(&now, &[]), ["+a", "+b"]);
    }

    #[test]
    fn diff_of_empty_current_is_all_left() {
        let now = MemberSet::default();
        assert_eq!(changes(&now, &["a", "b"]), ["-a", "-b"]);
    }

    #[test]
    fn diff_rejects_unsorted_previous() {
        let now = MemberSet::from_ids(["z"]);
        let result: Result<Vec<_>, _> = diff(&now, previous(&["b", "a"])).collect();
        assert!(result.is_err());
    }

    #[test]
    fn diff_orders_by_bytes_for_non_ascii() {
        let now = MemberSet::from_ids(["é", "z", "a"]);
        assert_eq!(now.iter().collect::<Vec<_>>(), ["a", "z", "é"]);
        assert_eq!(changes(&now, &["z", "é"]), ["+a", "=z", "=é"]);
    }

    #[test]
    fn encode_decode_round_trip() {
        let set = MemberSet::from_ids(["u-1", "ü-2", "u-3"]);
        let (bytes, count) = encode(set.iter().map(Ok::<_, io::Error>)).unwrap();
        assert_eq!(count, 3);
        let back: Vec<String> = decode(&bytes[..]).collect::<Result<_, _>>().unwrap();
        assert_eq!(back, ["u-1", "u-3", "ü-2"]);
    }

    #[test]
    fn decode_detects_truncation() {
        let set = MemberSet::from_ids(
            (0..1000)
                .map(|i| format!("user-{i}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        );
        let (bytes, _) = encode(set.iter().map(Ok::<_, io::Error>)).unwrap();
        let cut = &bytes[..bytes.len() - 4];
        let result: Result<Vec<String>, _> = decode(cut).collect();
        assert!(result.is_err());
    }
}
