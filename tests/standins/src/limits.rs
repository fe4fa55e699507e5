//! Limits and defaults the stand-ins enforce, kept together so that a limit learned
//! later from the real services is corrected in one place.
//!
//! Values marked GUESS are not documented by the vendor. The stand-ins still
//! enforce them, so a client that relies on another value fails here.

/// Maximum length of a Kameleoon `visitorCode`, in characters (Kameleoon Data API
/// reference for `POST /visit/events`; the SDKs accept up to 255).
pub const VISITOR_CODE_MAX_CHARS: usize = 100;

/// Maximum length of a Kameleoon `mappingValue`, in characters.
///
/// NOTE: GUESS. The Data API reference gives no limit for mapping values, so this
/// uses the 255 characters the Kameleoon SDKs allow for identifiers.
pub const MAPPING_VALUE_MAX_CHARS: usize = 255;

/// Number of hexadecimal digits in an event `nonce`.
pub const NONCE_HEX_DIGITS: usize = 16;

/// Default maximum size of a `POST /visit/events` body, in bytes (1 MiB). The
/// Kameleoon documentation has stated 1 MB, 3 MB and 10 MB in different versions.
pub const DEFAULT_EVENTS_BODY_LIMIT_BYTES: usize = 1024 * 1024;

/// Bodies up to this size are read and discarded before a 413 response, so that
/// a client still writing its body reads the 413 instead of a connection reset.
pub const MAX_DRAINED_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Maximum size of a Mixpanel Query API form body, in bytes.
///
/// NOTE: GUESS. Mixpanel documents no limit; operator bodies are a few hundred bytes.
pub const MIXPANEL_FORM_BODY_LIMIT_BYTES: usize = 1024 * 1024;

/// Maximum size of a Kameleoon Automation API or OAuth request body, in bytes (GUESS).
pub const AUTOMATION_BODY_LIMIT_BYTES: usize = 1024 * 1024;

/// Automation API allowance per client: 50 requests in any 10 seconds.
pub const AUTOMATION_REQUESTS_PER_10_SECONDS: u32 = 50;

/// Automation API allowance per client: 1,000 requests in any hour.
pub const AUTOMATION_REQUESTS_PER_HOUR: u32 = 1000;

/// Lifetime of a Kameleoon client-credentials access token, in seconds (two hours).
pub const TOKEN_LIFETIME_SECONDS: u64 = 7200;

/// Default and maximum `perPage` of Automation API list endpoints.
///
/// NOTE: GUESS. The real defaults are not documented.
pub const AUTOMATION_DEFAULT_PER_PAGE: usize = 100;
pub const AUTOMATION_MAX_PER_PAGE: usize = 200;

/// Mixpanel Query API: queries running at once per project.
pub const MIXPANEL_MAX_CONCURRENT_QUERIES: usize = 5;

/// Mixpanel Query API: queries per project in any sliding hour.
pub const MIXPANEL_QUERIES_PER_HOUR: u32 = 60;

/// Mixpanel Engage API: profiles per page.
pub const MIXPANEL_PAGE_SIZE: usize = 1000;

/// Idle time after which a Mixpanel Engage paging session expires, in seconds.
///
/// NOTE: GUESS. Mixpanel does not document how long a session stays valid.
pub const MIXPANEL_SESSION_IDLE_SECONDS: u64 = 600;

/// Requests kept in each stand-in's request log; older ones are discarded first.
pub const REQUEST_LOG_CAPACITY: usize = 200_000;

/// Rejected event lines kept with their text; later ones are only counted.
pub const REJECTED_LINES_CAPACITY: usize = 10_000;

/// Characters of a rejected line kept in the log.
pub const REJECTED_LINE_TEXT_CHARS: usize = 300;

/// Members a generated cohort may have (positions are stored as `u32`).
pub const MAX_GENERATED_MEMBERS: u64 = 50_000_000;
