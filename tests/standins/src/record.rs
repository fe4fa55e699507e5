//! The request log: every request to a real-service path is recorded with its
//! response status, so tests can assert on what a client sent.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::faults::Route;
use crate::limits::REQUEST_LOG_CAPACITY;
use crate::server::ConnectionCloser;
use crate::util::{now_ms, redact_authorization};

/// Path prefix of the control API; requests under it are not recorded.
pub const CONTROL_PREFIX: &str = "/_standin";

/// Request headers copied into the log (`authorization` is redacted).
const RECORDED_HEADERS: &[&str] = &[
    "authorization",
    "user-agent",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "accept",
    "accept-encoding",
    "x-mixpanel-integration-id",
];

/// One request as a stand-in received it, with the response it sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Sequence number, increasing from 1 in arrival order.
    pub id: u64,
    pub route: Option<Route>,
    pub method: String,
    pub path: String,
    /// Raw query string, without the `?`.
    pub query: Option<String>,
    /// Selected request headers, lower-case names; secrets are redacted.
    pub headers: BTreeMap<String, String>,
    /// Body bytes read; 0 when the body was rejected unread.
    pub body_bytes: u64,
    /// Non-empty body lines of a Data API events request.
    pub line_count: Option<u64>,
    pub accepted_lines: Option<u64>,
    pub rejected_lines: Option<u64>,
    pub duplicate_lines: Option<u64>,
    /// Response status code; 0 when no response was sent.
    pub status: u16,
    /// True when a fault closed the connection without a response.
    pub dropped: bool,
    /// True when the client went away before the response was ready.
    pub client_gone: bool,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub duration_ms: u64,
    /// Requests in progress on this server when this one arrived, itself included.
    pub in_flight: u64,
    /// Mixpanel: queries running for the project once this one was admitted.
    pub project_in_flight: Option<u64>,
    pub project_id: Option<u64>,
    pub cohort_id: Option<u64>,
    pub site_code: Option<String>,
    pub page: Option<u64>,
    pub session_id: Option<String>,
    /// Kameleoon: the OAuth client the request authenticated as.
    pub client_id: Option<String>,
    /// Id of the fault that acted on the request.
    pub fault_id: Option<u64>,
    /// Short explanation of an error response.
    pub note: Option<String>,
}

/// Details a handler adds to its request's record.
#[derive(Clone, Debug, Default)]
pub(crate) struct RecordDetails {
    pub route: Option<Route>,
    pub body_bytes: u64,
    pub line_count: Option<u64>,
    pub accepted_lines: Option<u64>,
    pub rejected_lines: Option<u64>,
    pub duplicate_lines: Option<u64>,
    pub project_in_flight: Option<u64>,
    pub project_id: Option<u64>,
    pub cohort_id: Option<u64>,
    pub site_code: Option<String>,
    pub page: Option<u64>,
    pub session_id: Option<String>,
    pub client_id: Option<String>,
    pub fault_id: Option<u64>,
    pub note: Option<String>,
    /// Set by a handler to close the connection without a response.
    pub close_connection: bool,
}

/// Request extension through which a handler fills in its record.
#[derive(Clone)]
pub(crate) struct RecordSlot {
    pub id: u64,
    details: Arc<Mutex<RecordDetails>>,
}

impl RecordSlot {
    /// Creates a slot that is not attached to any log, for requests served
    /// without the recording middleware.
    fn detached() -> Self {
        Self {
            id: 0,
            details: Arc::default(),
        }
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut RecordDetails)) {
        change(&mut self.details.lock());
    }

    fn snapshot(&self) -> RecordDetails {
        self.details.lock().clone()
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RecordSlot {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RecordSlot>()
            .cloned()
            .unwrap_or_else(RecordSlot::detached))
    }
}

/// The log of one server.
pub(crate) struct Recorder {
    next_id: AtomicU64,
    in_flight: AtomicU64,
    log: Mutex<RequestLog>,
}

#[derive(Default)]
struct RequestLog {
    records: VecDeque<RequestRecord>,
    discarded: u64,
}

impl Recorder {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            next_id: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            log: Mutex::new(RequestLog::default()),
        })
    }

    fn push(&self, record: RequestRecord) {
        let mut log = self.log.lock();
        if log.records.len() >= REQUEST_LOG_CAPACITY {
            log.records.pop_front();
            log.discarded += 1;
        }
        log.records.push_back(record);
    }

    /// Returns the finished requests with an id greater than `since`, by id.
    ///
    /// Ids follow arrival order but a request is logged when it finishes, so a
    /// slow request can appear after requests with higher ids.
    pub(crate) fn since(&self, since: u64) -> Vec<RequestRecord> {
        let log = self.log.lock();
        let mut records: Vec<RequestRecord> = log
            .records
            .iter()
            .filter(|record| record.id > since)
            .cloned()
            .collect();
        records.sort_by_key(|record| record.id);
        records
    }

    pub(crate) fn clear(&self) {
        let mut log = self.log.lock();
        log.records.clear();
        log.discarded = 0;
    }

    /// Returns the number of records discarded because the log was full.
    pub(crate) fn discarded(&self) -> u64 {
        self.log.lock().discarded
    }
}

/// Record under construction. It is pushed to the log when the response is
/// known, or when the request future is dropped because the client went away.
struct PendingRecord {
    recorder: Arc<Recorder>,
    slot: RecordSlot,
    record: Option<RequestRecord>,
    started: Instant,
}

impl PendingRecord {
    fn finish(&mut self, status: u16, dropped: bool, client_gone: bool) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        let details = self.slot.snapshot();
        record.route = details.route;
        record.body_bytes = details.body_bytes;
        record.line_count = details.line_count;
        record.accepted_lines = details.accepted_lines;
        record.rejected_lines = details.rejected_lines;
        record.duplicate_lines = details.duplicate_lines;
        record.project_in_flight = details.project_in_flight;
        record.project_id = details.project_id;
        record.cohort_id = details.cohort_id;
        record.site_code = details.site_code;
        record.page = details.page;
        record.session_id = details.session_id;
        record.client_id = details.client_id;
        record.fault_id = details.fault_id;
        record.note = details.note;

        record.status = status;
        record.dropped = dropped;
        record.client_gone = client_gone;
        record.finished_at_ms = now_ms();
        record.duration_ms = self.started.elapsed().as_millis() as u64;
        if status >= 400 || dropped || client_gone {
            tracing::info!(
                request_id = record.id,
                method = %record.method,
                path = %record.path,
                status,
                dropped,
                client_gone,
                note = record.note.as_deref().unwrap_or(""),
                "request ended without success"
            );
        } else {
            tracing::debug!(request_id = record.id, method = %record.method, path = %record.path, status, "request served");
        }
        self.recorder.push(record);
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        self.finish(0, false, true);
        self.recorder.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn recorded_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut selected = BTreeMap::new();
    for name in RECORDED_HEADERS {
        let Some(value) = headers.get(*name) else {
            continue;
        };
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let text = if *name == "authorization" {
            redact_authorization(&text)
        } else {
            text
        };
        selected.insert((*name).to_string(), text);
    }
    selected
}

/// Records every request outside the control API, and closes the connection
/// without a response when the handler requested it.
pub(crate) async fn record_requests(
    State(recorder): State<Arc<Recorder>>,
    mut request: Request,
    next: Next,
) -> Response {
    if request.uri().path().starts_with(CONTROL_PREFIX) {
        return next.run(request).await;
    }
    let id = recorder.next_id.fetch_add(1, Ordering::SeqCst) + 1;
    let in_flight = recorder.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let slot = RecordSlot {
        id,
        details: Arc::default(),
    };
    let started_at_ms = now_ms();
    let mut pending = PendingRecord {
        recorder: recorder.clone(),
        slot: slot.clone(),
        started: Instant::now(),
        record: Some(RequestRecord {
            id,
            route: None,
            method: request.method().to_string(),
            path: request.uri().path().to_string(),
            query: request.uri().query().map(str::to_string),
            headers: recorded_headers(request.headers()),
            body_bytes: 0,
            line_count: None,
            accepted_lines: None,
            rejected_lines: None,
            duplicate_lines: None,
            status: 0,
            dropped: false,
            client_gone: false,
            started_at_ms,
            finished_at_ms: 0,
            duration_ms: 0,
            in_flight,
            project_in_flight: None,
            project_id: None,
            cohort_id: None,
            site_code: None,
            page: None,
            session_id: None,
            client_id: None,
            fault_id: None,
            note: None,
        }),
    };
    let closer = request.extensions().get::<ConnectionCloser>().cloned();
    request.extensions_mut().insert(slot.clone());

    let response = next.run(request).await;

    if slot.snapshot().close_connection
        && let Some(closer) = closer
    {
        pending.finish(0, true, false);
        closer.close();
        // The connection task drops this future when it closes the socket.
        std::future::pending::<()>().await;
    }
    pending.finish(response.status().as_u16(), false, false);
    response
}
