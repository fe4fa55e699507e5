//! Paging through one Engage query.
//!
//! Mixpanel sends `session_id` and `total` with page 0 only. Every later
//! page must name that session, and the query ends at the first page with
//! fewer than `page_size` results, so a cohort whose size is a multiple of
//! the page size ends with an empty page. `total` is only an estimate for
//! progress: the end is never decided from it. One [`Paging`] serves one read
//! of a cohort, so no session or total carries over from an earlier read.

use super::{EngagePage, Error};

/// The request for the next page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest<'a> {
    /// Page number, from 0.
    pub page: u64,
    /// Session that page 0 opened; `None` for page 0.
    pub session_id: Option<&'a str>,
}

/// State of one paged read.
#[derive(Debug, Default)]
pub struct Paging {
    next_page: u64,
    done: bool,
    session_id: Option<String>,
    total: Option<u64>,
    profiles: u64,
    page_size: u64,
}

impl Paging {
    /// Starts a read at page 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the next page to request, or `None` once the last page was read.
    pub fn next_request(&self) -> Option<PageRequest<'_>> {
        if self.done {
            return None;
        }
        Some(PageRequest {
            page: self.next_page,
            session_id: (self.next_page > 0)
                .then_some(self.session_id.as_deref())
                .flatten(),
        })
    }

    /// Records the page returned for [`Paging::next_request`].
    ///
    /// Fails when page 0 is full but carries no `session_id`, because the
    /// following pages cannot be requested without one.
    pub fn record(&mut self, page: &EngagePage) -> Result<(), Error> {
        let page_size = page.page_size.max(1);
        let count = page.results.len() as u64;
        if self.next_page == 0 {
            self.session_id = page.session_id.clone().filter(|s| !s.is_empty());
            self.total = page.total;
            if count >= page_size && self.session_id.is_none() {
                return Err(Error::Decode(format!(
                    "engage page 0 holds {count} profiles but no session_id, so the following pages \
                     cannot be requested"
                )));
            }
        }
        self.page_size = page_size;
        self.profiles += count;
        if count < page_size {
            self.done = true;
        } else {
            self.next_page += 1;
        }
        Ok(())
    }

    /// Pages read so far.
    pub fn pages_read(&self) -> u64 {
        if self.done {
            self.next_page + 1
        } else {
            self.next_page
        }
    }

    /// Profiles read so far.
    pub fn profiles(&self) -> u64 {
        self.profiles
    }

    /// Profiles the query matches, as page 0 reported.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// Pages still to read according to `total`, or 0 when it is unknown.
    pub fn remaining_pages(&self) -> u64 {
        let Some(total) = self.total else { return 0 };
        if self.done {
            return 0;
        }
        total
            .div_ceil(self.page_size.max(1))
            .saturating_sub(self.pages_read())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixpanel::{Profile, Scalar};

    const PAGE_SIZE: u64 = 1000;

    /// Builds one page of a cohort of `cohort_size` profiles, as Mixpanel serves it:
    /// `session_id` on every page, `total` on page 0 only.
    fn page(number: u64, cohort_size: u64) -> EngagePage<'static> {
        let start = number * PAGE_SIZE;
        let end = cohort_size.min(start + PAGE_SIZE);
        let results = (start..end.max(start))
            .map(|i| Profile {
                distinct_id: Scalar::Text(format!("u-{i}").into()),
                properties: None,
            })
            .collect();
        EngagePage {
            page: number,
            page_size: PAGE_SIZE,
            session_id: Some("s-abc".to_string()),
            total: (number == 0).then_some(cohort_size),
            results,
        }
    }

    /// Reads a whole cohort and returns the requests sent, as (page, session).
    fn read(cohort_size: u64) -> (Vec<(u64, Option<String>)>, Paging) {
        let mut paging = Paging::new();
        let mut requests = Vec::new();
        while let Some(request) = paging.next_request() {
            assert!(requests.len() < 100, "paging does not stop");
            requests.push((request.page, request.session_id.map(str::to_string)));
            let number = request.page;
            paging.record(&page(number, cohort_size)).unwrap();
        }
        (requests, paging)
    }

    fn session() -> Option<String> {
        Some("s-abc".to_string())
    }

    #[test]
    fn partial_last_page_ends_the_read() {
        let (requests, paging) = read(2500);
        assert_eq!(
            requests,
            [(0, None), (1, session()), (2, session())],
            "pages after the first carry the session of page 0"
        );
        assert_eq!(paging.profiles(), 2500);
        assert_eq!(paging.pages_read(), 3);
    }

    #[test]
    fn full_last_page_ends_with_an_empty_page() {
        let (requests, paging) = read(2000);
        assert_eq!(requests, [(0, None), (1, session()), (2, session())]);
        assert_eq!(paging.profiles(), 2000);
    }

    #[test]
    fn empty_cohort_needs_one_request() {
        let (requests, paging) = read(0);
        assert_eq!(requests, [(0, None)]);
        assert_eq!(paging.profiles(), 0);
        assert_eq!(paging.total(), Some(0));
    }

    #[test]
    fn missing_total_does_not_end_the_read() {
        let mut paging = Paging::new();
        let mut first = page(0, 1500);
        first.total = None;
        paging.record(&first).unwrap();
        assert_eq!(paging.remaining_pages(), 0);
        let next = paging
            .next_request()
            .expect("a full page asks for the next one");
        assert_eq!(next.page, 1);
    }

    #[test]
    fn total_of_later_pages_is_ignored() {
        let mut paging = Paging::new();
        paging.record(&page(0, 2500)).unwrap();
        let mut second = page(1, 2500);
        second.total = Some(1);
        paging.record(&second).unwrap();
        assert_eq!(paging.total(), Some(2500));
        assert_eq!(paging.remaining_pages(), 1);
    }

    #[test]
    fn new_read_starts_without_old_session() {
        let (_, first) = read(2500);
        assert!(first.next_request().is_none());
        let second = Paging::new();
        assert_eq!(
            second.next_request(),
            Some(PageRequest {
                page: 0,
                session_id: None
            })
        );
        assert_eq!(second.total(), None);
    }

    #[test]
    fn full_first_page_without_session_fails() {
        let mut paging = Paging::new();
        let mut first = page(0, 1500);
        first.session_id = None;
        let error = paging.record(&first).unwrap_err();
        assert!(error.to_string().contains("no session_id"), "{error}");
    }

    #[test]
    fn short_first_page_needs_no_session() {
        let mut paging = Paging::new();
        let mut first = page(0, 10);
        first.session_id = None;
        paging.record(&first).unwrap();
        assert!(paging.next_request().is_none());
    }

    #[test]
    fn remaining_pages_follow_total() {
        let mut paging = Paging::new();
        paging.record(&page(0, 2500)).unwrap();
        assert_eq!(paging.remaining_pages(), 2);
        paging.record(&page(1, 2500)).unwrap();
        assert_eq!(paging.remaining_pages(), 1);
        paging.record(&page(2, 2500)).unwrap();
        assert_eq!(paging.remaining_pages(), 0);
    }
}
