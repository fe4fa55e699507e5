//! Running the operator: health and metrics endpoints, kstatus and the Argo
//! CD health check on real objects, JSON logs, graceful shutdown, secrets
//! kept out of every output, and the GitOps examples.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use kameleoon_cohort_operator::crd::AttemptResult;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::{Value, json};
use standins::{Fault, Route};
use testkit::anyhow::{Context, anyhow, bail, ensure};
use testkit::{Operator, Result, kstatus, repo_root, tools_bin, wait_until};

use crate::chart::{find, parse_documents, render};
use crate::support::*;

/// Message of the log line that names the bound addresses.
const SERVING: &str = "Serving metrics and health endpoints";

/// Reads the metrics and health addresses from the operator's start-up log
/// line, in the text (`metrics=ADDR`) or the JSON (`"metrics":"ADDR"`) format.
pub fn logged_addresses(logs: &str) -> Option<(SocketAddr, SocketAddr)> {
    let line = logs.lines().find(|l| l.contains(SERVING))?;
    let field = |key: &str| -> Option<SocketAddr> {
        [format!("{key}="), format!("\"{key}\":\"")]
            .iter()
            .find_map(|pattern| {
                let start = line.find(pattern.as_str())? + pattern.len();
                let rest = &line[start..];
                let end = rest
                    .find(|c: char| c == '"' || c.is_whitespace())
                    .unwrap_or(rest.len());
                rest[..end].parse().ok()
            })
    };
    Some((field("metrics")?, field("health")?))
}

/// Waits until the operator logged its bound metrics and health addresses.
pub async fn wait_for_addresses(env: &Env) -> Result<(SocketAddr, SocketAddr)> {
    wait_until(
        TIMEOUT,
        "the operator to log its metrics and health addresses",
        async || logged_addresses(&env.logs()).ok_or_else(|| anyhow!("not logged yet")),
    )
    .await
}

/// An HTTP response.
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// Sends `GET path` over HTTP/1.1 to a loopback address.
pub async fn http_get(address: SocketAddr, path: &str) -> Result<HttpResponse> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || -> Result<HttpResponse> {
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
            .with_context(|| format!("connecting to {address}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8(raw).context("the response is not UTF-8")?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no header end in {text:?}"))?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow!("no status line in {head:?}"))?;
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
                .map(|(_, value)| value.trim().to_string())
        };
        let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            dechunk(body)?
        } else {
            body.to_string()
        };
        Ok(HttpResponse {
            status,
            content_type: header("content-type").unwrap_or_default(),
            body,
        })
    })
    .await?
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or_else(|| anyhow!("short chunk"))?);
        body = rest.get(size + 2..).ok_or_else(|| anyhow!("short chunk"))?;
    }
}

/// One sample of a Prometheus text exposition.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape: metric families by name with their type, and samples.
#[derive(Debug, Default)]
pub struct Scrape {
    pub families: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Sum of the samples of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Returns whether any sample of `name` has `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Returns whether a metric name used in a query exists: a family, or a
    /// family with the suffix of a counter or histogram series.
    pub fn defines(&self, name: &str) -> bool {
        ["", "_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|family| self.families.contains_key(family))
            })
    }
}

/// Parses the Prometheus and OpenMetrics text formats; fails on any line it
/// cannot read, so a malformed exposition fails the test.
pub fn parse_prometheus(text: &str) -> Result<Scrape> {
    let mut scrape = Scrape::default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    scrape.families.insert(name.to_string(), kind.to_string());
                }
                (Some("HELP" | "UNIT"), Some(_), _) | (Some("EOF"), None, None) => {}
                _ => bail!("unexpected comment line {line:?}"),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => bail!("no value on line {line:?}"),
        };
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '}' {
                    end = Some(i);
                    break;
                }
                if c == ',' || c == ' ' {
                    continue;
                }
                let key_start = i;
                let mut key_end = i;
                for (j, k) in chars.by_ref() {
                    if k == '=' {
                        key_end = j;
                        break;
                    }
                }
                let key = inner[key_start..key_end].to_string();
                ensure!(
                    chars.next().map(|(_, c)| c) == Some('"'),
                    "unquoted label value on line {line:?}"
                );
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, other)) => value.push(other),
                            None => bail!("unfinished escape on line {line:?}"),
                        },
                        Some((_, '"')) => break,
                        Some((_, other)) => value.push(other),
                        None => bail!("unfinished label value on line {line:?}"),
                    }
                }
                labels.insert(key, value);
            }
            let end = end.ok_or_else(|| anyhow!("no closing brace on line {line:?}"))?;
            rest = &inner[end + 1..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow!("no value on line {line:?}"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .with_context(|| format!("bad value on line {line:?}"))?,
        };
        scrape.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(scrape)
}

/// Scrapes `/metrics` and parses it.
pub async fn scrape(address: SocketAddr) -> Result<Scrape> {
    let response = http_get(address, "/metrics").await?;
    ensure!(
        response.status == 200,
        "/metrics answered {}: {}",
        response.status,
        response.body
    );
    parse_prometheus(&response.body)
}

/// A JSON object whose top-level keys are all distinct.
struct DistinctKeys;

impl<'de> Deserialize<'de> for DistinctKeys {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = DistinctKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<DistinctKeys, A::Error> {
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                    }
                }
                Ok(DistinctKeys)
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// Parses a JSON log: every line must be one JSON object without repeated keys.
pub fn json_log_lines(logs: &str) -> Result<Vec<Value>> {
    logs.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            serde_json::from_str::<DistinctKeys>(line)
                .with_context(|| format!("bad JSON log line {line}"))?;
            let value: Value = serde_json::from_str(line)?;
            ensure!(value.is_object(), "log line is not an object: {line}");
            Ok(value)
        })
        .collect()
}

/// Runs the Argo CD health check of `examples/gitops` on an object, as Argo
/// CD does, and returns `(status, message)`.
pub fn argocd_health(object: &Value) -> Result<(String, String)> {
    let script = repo_root().join("examples/gitops/argocd-health.lua");
    let mut child = std::process::Command::new(tools_bin()?.join("argocd-health"))
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting argocd-health (built by hack/tools.sh)")?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(object)?)?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "argocd-health failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout)?;
    Ok((
        result["status"].as_str().unwrap_or_default().to_string(),
        result["message"].as_str().unwrap_or_default().to_string(),
    ))
}

/// Metric names (`cohortsync_...`) that a query text uses.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("cohortsync_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn metrics_and_health_endpoints_work() -> Result<()> {
    let mut env = Env::new("ops-metrics").await?;
    env.start_operator(&[]).await?;
    let (metrics, health) = wait_for_addresses(&env).await?;
    assert!(
        metrics.port() != 0 && health.port() != 0,
        "the log names port 0: {metrics} {health}"
    );
    assert_ne!(metrics, health);

    let healthz = http_get(health, "/healthz").await?;
    assert_eq!(healthz.status, 200);
    assert_eq!(healthz.body, "ok\n");
    wait_until(TIMEOUT, "/readyz to answer 200", async || {
        let readyz = http_get(health, "/readyz").await?;
        ensure!(readyz.status == 200, "{} {}", readyz.status, readyz.body);
        Ok(())
    })
    .await?;
    assert_eq!(
        http_get(health, "/metrics").await?.status,
        404,
        "metrics leak onto the health port"
    );

    let response = http_get(metrics, "/metrics").await?;
    assert!(
        response
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        response.content_type
    );
    assert!(
        response.body.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF"
    );
    parse_prometheus(&response.body)?;
    // Without leader election the process leads as soon as its controllers start.
    let before = wait_until(TIMEOUT, "cohortsync_leader to be 1", async || {
        let before = scrape(metrics).await?;
        let leader = before.sum("cohortsync_leader", &[]);
        ensure!(leader == 1.0, "cohortsync_leader is {leader}");
        Ok(before)
    })
    .await?;

    // A rejected credential counts as a reconciliation error, and a 429
    // with Retry-After as a rate-limit wait, so every family has samples.
    env.apply(&secrets_yaml("mp-secret-1", "wrong-km-secret"))
        .await?;
    env.apply(CONNECTION).await?;
    env.wait_connection(
        "production",
        "Connected",
        "False",
        "KameleoonCredentialsRejected",
    )
    .await?;
    env.apply(&secrets_yaml("mp-secret-1", "km-secret-1"))
        .await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;
    env.kameleoon.add_fault(
        Fault::respond(Route::Events, 429, json!({"error": "Too many requests"})).retry_after(1),
    );
    env.apply(&sync_yaml("vip", "{id: 501}", "OneTime", ""))
        .await?;
    env.wait_sync("vip", "the export", exported).await?;
    let ns = env.ns().to_string();
    let sync_labels = [("namespace", ns.as_str()), ("name", "vip")];
    let after = wait_until(
        TIMEOUT,
        "the scrape to report the sync as ready",
        async || {
            let after = scrape(metrics).await?;
            let ready = after.sum(
                "cohortsync_sync_state",
                &[("namespace", &ns), ("name", "vip"), ("state", "ready")],
            );
            ensure!(ready == 1.0, "sync_state ready is {ready}");
            Ok(after)
        },
    )
    .await?;

    for service in ["mixpanel", "kameleoon"] {
        let labels = [("service", service)];
        let (then, now) = (
            before.sum("cohortsync_api_requests_total", &labels),
            after.sum("cohortsync_api_requests_total", &labels),
        );
        assert!(
            now > then,
            "{service} requests did not move: {then} -> {now}"
        );
    }
    let labels = [("controller", "cohortsync")];
    assert!(
        after.sum("cohortsync_reconciliations_total", &labels)
            > before.sum("cohortsync_reconciliations_total", &labels)
    );
    assert!(!before.has("cohortsync_exported_members", &sync_labels));
    assert_eq!(after.sum("cohortsync_exported_members", &sync_labels), 3.0);
    assert!(
        after.sum(
            "cohortsync_export_duration_seconds_count",
            &[("result", "succeeded")]
        ) >= 1.0
    );
    let project = [("region", "US"), ("project_id", "1111")];
    assert!(after.sum("cohortsync_mixpanel_queries_total", &project) >= 1.0);
    assert_eq!(
        after.sum("cohortsync_mixpanel_query_allowance", &project),
        60.0
    );
    assert_eq!(
        after.sum("cohortsync_sync_state", &sync_labels),
        1.0,
        "one state per sync"
    );
    let rejected = [
        ("controller", "kameleoonconnection"),
        ("reason", "KameleoonCredentialsRejected"),
    ];
    assert!(after.sum("cohortsync_reconcile_errors_total", &rejected) >= 1.0);
    let waited = [("service", "kameleoon"), ("cause", "retry_after")];
    assert!(after.sum("cohortsync_rate_limit_waits_total", &waited) >= 1.0);
    assert!(after.sum("cohortsync_rate_limit_wait_seconds_total", &waited) >= 1.0);
    for (family, kind) in [
        ("cohortsync_api_requests", "counter"),
        ("cohortsync_export_duration_seconds", "histogram"),
        ("cohortsync_exported_members", "gauge"),
        ("cohortsync_sync_state", "gauge"),
    ] {
        assert_eq!(
            after.families.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }

    // The dashboard and the alert rules only use metrics the operator exports.
    let dashboard = std::fs::read_to_string(
        crate::chart::chart_dir().join("dashboards/kameleoon-cohort-operator.json"),
    )?;
    let rules = crate::chart::template_output("m", "ops", "prometheusRule: {enabled: true}")
        .await?
        .ensure_success("template")?
        .stdout;
    let used = metric_names(&format!("{dashboard}\n{rules}"));
    for name in [
        "cohortsync_sync_state",
        "cohortsync_mixpanel_queries_total",
        "cohortsync_exported_members",
    ] {
        assert!(used.contains(name), "the dashboard does not use {name}");
    }
    let unknown: Vec<&String> = used.iter().filter(|n| !after.defines(n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard or rules use unknown metrics {unknown:?}; families: {:?}",
        after.families.keys()
    );

    // A deleted sync leaves no series behind.
    env.syncs().delete("vip", &Default::default()).await?;
    wait_until(
        TIMEOUT,
        "the deleted sync's series to disappear",
        async || {
            let now = scrape(metrics).await?;
            ensure!(
                !now.has("cohortsync_sync_state", &sync_labels),
                "sync_state still reported"
            );
            ensure!(
                !now.has("cohortsync_exported_members", &sync_labels),
                "exported_members still reported"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// A CohortSync as the API server returns it, with apiVersion and kind.
async fn sync_object(env: &Env, name: &str) -> Result<Value> {
    let api = env.cluster.dynamic_api(
        Some(env.ns()),
        "cohortsync.io/v1alpha1",
        "CohortSync",
        "cohortsyncs",
    );
    Ok(serde_json::to_value(api.get(name).await?)?)
}

fn assert_judged(
    object: &Value,
    kstatus_expected: Option<&str>,
    argocd_expected: &str,
) -> Result<()> {
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    if let Some(expected) = kstatus_expected {
        let (status, message) = kstatus(object)?;
        ensure!(
            status == expected,
            "kstatus of {name} is {status} ({message}), expected {expected}; object: {object}"
        );
    }
    let (status, message) = argocd_health(object)?;
    ensure!(
        status == argocd_expected,
        "Argo CD health of {name} is {status} ({message}), expected {argocd_expected}"
    );
    ensure!(
        !message.is_empty(),
        "Argo CD health of {name} has no message"
    );
    Ok(())
}

#[tokio::test]
async fn kstatus_and_argocd_health_follow_syncs() -> Result<()> {
    let mut env = Env::new("ops-status").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    let connection = env
        .wait_connection("production", "Ready", "True", "Connected")
        .await?;
    let mut connection = serde_json::to_value(&connection)?;
    connection["apiVersion"] = json!("cohortsync.io/v1alpha1");
    connection["kind"] = json!("KameleoonConnection");
    assert_judged(&connection, Some("Current"), "Healthy")?;

    env.apply(&sync_yaml("ready", "{id: 501}", "OneTime", ""))
        .await?;
    env.wait_sync("ready", "the export", exported).await?;
    assert_judged(
        &sync_object(&env, "ready").await?,
        Some("Current"),
        "Healthy",
    )?;

    env.apply(&sync_yaml("stalled", "{id: 999999}", "OneTime", ""))
        .await?;
    env.wait_condition("stalled", "Stalled", "True", "CohortNotFound")
        .await?;
    assert_judged(
        &sync_object(&env, "stalled").await?,
        Some("Failed"),
        "Degraded",
    )?;

    // The first Engage page of cohort 502 takes 20 seconds, long enough to
    // look at the export while it runs.
    env.mixpanel
        .add_fault(Fault::delay(Route::Engage, 20_000).cohort(502));
    env.apply(&sync_yaml("exporting", "{id: 502}", "OneTime", ""))
        .await?;
    env.wait_sync("exporting", "the export to run", |sync| {
        let status = sync.status.as_ref().ok_or("no status")?;
        let running = status
            .last_attempt
            .as_ref()
            .is_some_and(|a| a.result == AttemptResult::Running);
        if !running {
            return Err("no running attempt".into());
        }
        condition_is(&status.conditions, "Reconciling", "True", "")
    })
    .await?;
    assert_judged(
        &sync_object(&env, "exporting").await?,
        Some("InProgress"),
        "Progressing",
    )?;

    env.apply(&sync_yaml(
        "paused",
        "{id: 503}",
        "OneTime",
        "  suspend: true",
    ))
    .await?;
    env.wait_sync("paused", "the sync to report Suspended", |sync| {
        let status = sync.status.as_ref().ok_or("no status")?;
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .ok_or("no Ready condition")?;
        if ready.reason == "Suspended" {
            Ok(())
        } else {
            Err(format!("Ready has reason {}", ready.reason))
        }
    })
    .await?;
    assert_judged(&sync_object(&env, "paused").await?, None, "Suspended")?;

    // Once the slow page arrives the export finishes and both judge it done.
    env.wait_sync("exporting", "the delayed export to finish", exported)
        .await?;
    assert_judged(
        &sync_object(&env, "exporting").await?,
        Some("Current"),
        "Healthy",
    )?;
    Ok(())
}

#[tokio::test]
async fn sigterm_when_idle_exits_zero() -> Result<()> {
    let mut env = Env::new("ops-sigterm").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;
    let (_, health) = wait_for_addresses(&env).await?;
    wait_until(TIMEOUT, "/readyz to answer 200", async || {
        ensure!(
            http_get(health, "/readyz").await?.status == 200,
            "not ready"
        );
        Ok(())
    })
    .await?;

    let started = Instant::now();
    let operator = env.operator.as_mut().unwrap();
    let status = operator.terminate_within(Duration::from_secs(10)).await?;
    let elapsed = started.elapsed();
    let logs = env.logs();
    assert!(status.success(), "exit status {status}; log:\n{logs}");
    assert!(
        elapsed < Duration::from_secs(5),
        "shutdown took {elapsed:?}; log:\n{logs}"
    );
    assert!(logs.contains("SIGTERM received; shutting down"), "{logs}");
    assert!(logs.contains("Controllers stopped"), "{logs}");
    assert!(
        logs.lines().last().unwrap_or_default().contains("Stopped"),
        "{logs}"
    );
    assert!(!logs.contains(" ERROR "), "errors during shutdown:\n{logs}");
    assert!(
        http_get(health, "/healthz").await.is_err(),
        "the health port still answers after exit"
    );
    Ok(())
}

#[tokio::test]
async fn json_logs_name_the_object() -> Result<()> {
    let mut env = Env::new("ops-json").await?;
    env.start_operator(&["--log-format", "json"]).await?;
    env.connect().await?;
    env.apply(&sync_yaml("vip", "{id: 501}", "OneTime", ""))
        .await?;
    env.apply(&sync_yaml("unknown", "{id: 999999}", "OneTime", ""))
        .await?;
    env.wait_sync("vip", "the export", exported).await?;
    env.wait_condition("unknown", "Stalled", "True", "CohortNotFound")
        .await?;
    let status = env.operator.as_mut().unwrap().terminate().await?;
    assert!(status.success());

    let logs = env.logs();
    let lines = json_log_lines(&logs)?;
    let ns = env.ns();
    for line in &lines {
        for key in ["timestamp", "level", "message", "target"] {
            assert!(
                line.get(key).is_some_and(Value::is_string),
                "no {key} in {line}"
            );
        }
    }
    // Every line of an object's work names the object.
    let work: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("kameleoon_cohort_operator::controller::"))
        })
        .collect();
    assert!(work.len() >= 4, "too few controller lines:\n{logs}");
    for line in &work {
        assert_eq!(line["namespace"], ns, "no namespace on {line}");
        assert!(
            line["name"].as_str().is_some_and(|n| !n.is_empty()),
            "no name on {line}"
        );
    }
    let messages_of = |name: &str| -> Vec<&str> {
        work.iter()
            .filter(|l| l["name"] == name)
            .filter_map(|l| l["message"].as_str())
            .collect()
    };
    for expected in ["Export started", "Export succeeded"] {
        assert!(
            messages_of("vip").contains(&expected),
            "{expected} missing: {:?}",
            messages_of("vip")
        );
    }
    assert!(
        !messages_of("production").is_empty(),
        "no line names the connection"
    );
    assert!(
        !messages_of("unknown").is_empty(),
        "no line names the stalled sync"
    );
    Ok(())
}

#[tokio::test]
async fn secret_values_never_logged() -> Result<()> {
    let mut env = Env::new("ops-secrets").await?;
    let mixpanel_secret = "mp-secret-4f9a1c7e0b2d";
    let kameleoon_secret = "km-secret-8e3b6d2a9c1f";
    let rotated_secret = "km-rotated-5a7c2e9f3b1d";
    env.mixpanel
        .set_account_secret("sa.growth", mixpanel_secret)?;
    env.kameleoon
        .set_client_secret("growth-operator", kameleoon_secret, true)?;

    // Everything at debug level, every dependency included.
    let args = env.args(&["--log-format", "json"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = env.cluster.kubeconfig_path().to_string_lossy().into_owned();
    env.operator = Some(Operator::spawn(
        env!("CARGO_BIN_EXE_kameleoon-cohort-operator"),
        &args,
        &[("KUBECONFIG", &kubeconfig), ("RUST_LOG", "debug")],
    )?);

    env.apply(&secrets_yaml(mixpanel_secret, kameleoon_secret))
        .await?;
    env.apply(CONNECTION).await?;
    env.apply(&sync_yaml("vip", "{id: 501}", "OneTime", ""))
        .await?;
    env.wait_sync("vip", "the export", exported).await?;

    // A rotation to a secret Kameleoon rejects.
    env.apply(&secrets_yaml(mixpanel_secret, rotated_secret))
        .await?;
    env.wait_connection(
        "production",
        "Connected",
        "False",
        "KameleoonCredentialsRejected",
    )
    .await?;
    let status = env.operator.as_mut().unwrap().terminate().await?;
    assert!(status.success());

    let logs = env.logs();
    assert!(
        logs.lines().count() > 100,
        "the debug log is suspiciously short:\n{logs}"
    );
    let events = env
        .cluster
        .kubectl(&["get", "events", "-n", env.ns(), "-o", "yaml"], None)
        .await?
        .ensure_success()?
        .stdout;
    let objects = env
        .cluster
        .kubectl(
            &[
                "get",
                "kameleoonconnections,cohortsyncs",
                "-n",
                env.ns(),
                "-o",
                "yaml",
            ],
            None,
        )
        .await?
        .ensure_success()?
        .stdout;
    let base64 = base64::engine::general_purpose::STANDARD;
    for secret in [mixpanel_secret, kameleoon_secret, rotated_secret] {
        for form in [secret.to_string(), base64.encode(secret)] {
            assert!(!logs.contains(&form), "{form} appears in the operator log");
            assert!(!events.contains(&form), "{form} appears in an Event");
            assert!(!objects.contains(&form), "{form} appears in a status");
        }
    }
    Ok(())
}

#[tokio::test]
async fn gitops_examples_are_consistent() -> Result<()> {
    let env = Env::new("ops-gitops").await?;
    let gitops = repo_root().join("examples/gitops");
    let script = std::fs::read_to_string(gitops.join("argocd-health.lua"))?;

    // argocd-cm.yaml carries the same script for both kinds.
    let config: Value = serde_yaml::from_str(&std::fs::read_to_string(
        gitops.join("argocd/argocd-cm.yaml"),
    )?)?;
    for kind in ["CohortSync", "KameleoonConnection"] {
        let key = format!("resource.customizations.health.cohortsync.io_{kind}");
        assert_eq!(
            config["data"][&key].as_str(),
            Some(script.as_str()),
            "{key} differs from argocd-health.lua"
        );
    }

    // The health check on crafted objects, for the cases the cluster tests
    // do not reach.
    let condition = |type_: &str, status: &str, reason: &str| json!({"type": type_, "status": status, "reason": reason, "message": format!("{reason} message")});
    let object = |generation: i64, observed: i64, conditions: Vec<Value>| {
        json!({
            "apiVersion": "cohortsync.io/v1alpha1",
            "kind": "CohortSync",
            "metadata": {"name": "s", "namespace": "growth", "generation": generation},
            "status": {"observedGeneration": observed, "conditions": conditions}
        })
    };
    let cases = [
        (
            json!({"metadata": {"name": "new", "generation": 1}}),
            "Progressing",
            "Waiting for the operator",
        ),
        (
            object(3, 2, vec![condition("Ready", "True", "Succeeded")]),
            "Progressing",
            "generation 3",
        ),
        (
            object(1, 1, vec![condition("Ready", "True", "Succeeded")]),
            "Healthy",
            "Succeeded",
        ),
        (
            object(1, 1, vec![condition("Ready", "True", "Connected")]),
            "Healthy",
            "Connected",
        ),
        (
            object(
                1,
                1,
                vec![
                    condition("Ready", "Unknown", "Exporting"),
                    condition("Reconciling", "True", "Exporting"),
                ],
            ),
            "Progressing",
            "Exporting",
        ),
        (
            object(
                1,
                1,
                vec![
                    condition("Ready", "False", "MixpanelUnavailable"),
                    condition("Reconciling", "True", "MixpanelUnavailable"),
                ],
            ),
            "Progressing",
            "MixpanelUnavailable",
        ),
        (
            object(
                1,
                1,
                vec![
                    condition("Ready", "False", "CohortNotFound"),
                    condition("Stalled", "True", "CohortNotFound"),
                ],
            ),
            "Degraded",
            "CohortNotFound",
        ),
        (
            object(
                1,
                1,
                vec![
                    condition("Ready", "False", "Stale"),
                    condition("Reconciling", "True", "Stale"),
                ],
            ),
            "Degraded",
            "Stale",
        ),
        (
            object(1, 1, vec![condition("Ready", "True", "Suspended")]),
            "Suspended",
            "Suspended",
        ),
        (
            object(
                1,
                1,
                vec![condition("Ready", "False", "ConnectionNotReady")],
            ),
            "Degraded",
            "ConnectionNotReady",
        ),
        (object(1, 1, vec![]), "Progressing", "Ready"),
    ];
    for (input, expected, message_part) in cases {
        let (status, message) = argocd_health(&input)?;
        assert_eq!(status, expected, "{input}: {message}");
        assert!(
            message.contains(message_part),
            "{input}: message {message:?} lacks {message_part:?}"
        );
    }

    // The values in the Flux HelmRelease and the Argo CD Application pass
    // the chart's schema and render.
    let release: Value = serde_yaml::from_str(&std::fs::read_to_string(
        gitops.join("flux/operator/helmrelease.yaml"),
    )?)?;
    let application: Value = serde_yaml::from_str(&std::fs::read_to_string(
        gitops.join("argocd/operator.yaml"),
    )?)?;
    for values in [
        &release["spec"]["values"],
        &application["spec"]["source"]["helm"]["valuesObject"],
    ] {
        let docs = render("gitops", "cohort-system", &serde_yaml::to_string(values)?).await?;
        let deployment = find(&docs, "Deployment", "gitops-kameleoon-cohort-operator").unwrap();
        assert!(crate::chart::container_args(deployment).contains(&"--leader-elect".to_string()));
        assert!(find(&docs, "PrometheusRule", "gitops-kameleoon-cohort-operator").is_some());
    }

    // Every path the GitOps objects name exists in this repository.
    let mut paths = vec![
        release["spec"]["chart"]["spec"]["chart"]
            .as_str()
            .unwrap()
            .to_string(),
        application["spec"]["source"]["path"]
            .as_str()
            .unwrap()
            .to_string(),
    ];
    let syncs_app: Value =
        serde_yaml::from_str(&std::fs::read_to_string(gitops.join("argocd/syncs.yaml"))?)?;
    paths.push(
        syncs_app["spec"]["source"]["path"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    for document in parse_documents(&std::fs::read_to_string(
        gitops.join("flux/kustomizations.yaml"),
    )?)? {
        if document["kind"] == "Kustomization" {
            paths.push(document["spec"]["path"].as_str().unwrap().to_string());
        }
    }
    for path in &paths {
        assert!(repo_root().join(path).is_dir(), "{path} does not exist");
    }

    // The growth directory builds with kustomize and the server accepts its
    // objects (in the test namespace instead of growth).
    for dir in ["growth", "flux/operator"] {
        let path = gitops.join(dir);
        let built = env
            .cluster
            .kubectl(&["kustomize", &path.to_string_lossy()], None)
            .await?
            .ensure_success()?;
        ensure!(
            !parse_documents(&built.stdout)?.is_empty(),
            "{dir} builds to nothing"
        );
    }
    let built = env
        .cluster
        .kubectl(
            &["kustomize", &gitops.join("growth").to_string_lossy()],
            None,
        )
        .await?
        .ensure_success()?;
    let documents = parse_documents(&built.stdout)?;
    let mut kinds: Vec<&str> = documents
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "CohortSync",
            "CohortSync",
            "KameleoonConnection",
            "Namespace"
        ]
    );
    let mut custom = String::new();
    for mut document in documents.into_iter().filter(|d| d["kind"] != "Namespace") {
        assert_eq!(document["metadata"]["namespace"], "growth");
        document["metadata"]["namespace"] = json!(env.ns());
        custom.push_str("---\n");
        custom.push_str(&serde_yaml::to_string(&document)?);
    }
    let output = env
        .cluster
        .kubectl(
            &[
                "apply",
                "--dry-run=server",
                "--server-side",
                "--field-manager=gitops-test",
                "-f",
                "-",
            ],
            Some(&custom),
        )
        .await?;
    ensure!(
        output.success(),
        "the server rejected the growth objects: {}",
        output.stderr
    );
    Ok(())
}
