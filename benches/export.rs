//! Export benchmark: one OneTime export of generated cohorts through the
//! operator on a real control plane, measured against the lower bounds of
//! API calls and against a script doing the same job (`benches/peer`), plus
//! the control loop at 1,000 CohortSyncs.
//!
//! Run it with `hack/bench.sh`, which installs the peer's Python packages
//! and passes the options below; `docs/benchmarks.md` records the results.
//!
//! Options: `--sizes 10000,100000,1000000`, `--no-peer`,
//! `--rate-limited N` (export N profiles at a shortened query window, 0 to
//! skip), `--scale SYNCS,NAMESPACES` (0,0 to skip), `--window SECONDS` (how
//! long the scale run watches the operator at rest and after a restart,
//! default 60), `--json PATH`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kameleoon_cohort_operator::crd::{CohortSync, MatchBy};
use kameleoon_cohort_operator::kameleoon::events;
use kube::api::{Api, ListParams};
use serde_json::json;
use standins::kameleoon::IdentifierKind;
use standins::seed::GeneratorSeed;
use standins::{KameleoonConfig, KameleoonStandin, MixpanelConfig, MixpanelStandin, Seed};
use testkit::{Cluster, Operator, Result, TempNamespace, anyhow, wait_until};

const SITE: &str = "abc123xyz0";
const CLIENT_ID: &str = "bench-operator";
const CLIENT_SECRET: &str = "km-bench-secret";
const USERNAME: &str = "sa.bench";
const SECRET: &str = "mp-bench-secret";
const COHORT: u64 = 700;

struct Options {
    sizes: Vec<u64>,
    peer: bool,
    rate_limited: u64,
    scale: (usize, usize),
    window: Duration,
    json: Option<PathBuf>,
}

fn options() -> Result<Options> {
    let mut options = Options {
        sizes: vec![10_000, 100_000, 1_000_000],
        peer: true,
        rate_limited: 100_000,
        scale: (1000, 20),
        window: Duration::from_secs(60),
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--bench" => {}
            "--sizes" => {
                options.sizes = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::parse)
                    .collect::<std::result::Result<_, _>>()?
            }
            "--no-peer" => options.peer = false,
            "--rate-limited" => options.rate_limited = value()?.parse()?,
            "--scale" => {
                let text = value()?;
                let (syncs, namespaces) = text
                    .split_once(',')
                    .ok_or_else(|| anyhow::anyhow!("--scale takes SYNCS,NAMESPACES, got {text}"))?;
                options.scale = (syncs.parse()?, namespaces.parse()?);
            }
            "--window" => options.window = Duration::from_secs(value()?.parse()?),
            "--json" => options.json = Some(PathBuf::from(value()?)),
            other => anyhow::bail!(
                "unknown option {other}; see the comment at the top of benches/export.rs"
            ),
        }
    }
    Ok(options)
}

fn main() -> Result<()> {
    let options = options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

async fn run(options: Options) -> Result<()> {
    let cluster = Cluster::shared().await;
    install_crds(cluster).await?;
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());

    let mut sizes = Vec::new();
    for &size in &options.sizes {
        let result = export_size(cluster, size, options.peer).await?;
        println!("{}", serde_json::to_string(&result)?);
        sizes.push(result);
    }
    report.insert("exports".into(), json!(sizes));

    if options.rate_limited > 0 {
        let result = rate_limited(cluster, options.rate_limited).await?;
        println!("{}", serde_json::to_string(&result)?);
        report.insert("rate_limited".into(), result);
    }
    if options.scale.0 > 0 {
        let result = scale(cluster, options.scale.0, options.scale.1, options.window).await?;
        println!("{}", serde_json::to_string(&result)?);
        report.insert("scale".into(), result);
    }
    if let Some(path) = options.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": memory as f64 / 1024.0 / 1024.0,
    })
}

async fn install_crds(cluster: &Cluster) -> Result<()> {
    cluster
        .apply_crds(&kameleoon_cohort_operator::crd::definitions_yaml()?)
        .await
}

/// A realistic generated cohort: a few percent anonymous, some mapping ids,
/// some long and some non-ASCII distinct ids.
fn generator(count: u64) -> GeneratorSeed {
    serde_json::from_value(json!({
        "count": count,
        "seed": 42,
        "id_prefix": "user-",
        "percent_anonymous": 3,
        "percent_mapping_id": 20,
        "percent_long_ids": 2,
        "long_id_length": 90,
        "percent_non_ascii": 2,
    }))
    .expect("generator settings deserialize")
}

/// Projects, each with its own Kameleoon client and site (`site_code`), so
/// that no client runs into Kameleoon's per-client Automation API limit.
fn seed(projects: &[u64]) -> Result<Seed> {
    let mixpanel_projects: Vec<serde_json::Value> = projects
        .iter()
        .map(|id| json!({"id": id, "api_access": true, "cohorts": [{"id": COHORT, "name": "Benchmark", "members": []}]}))
        .collect();
    let clients: Vec<serde_json::Value> = projects
        .iter()
        .map(|id| json!({"client_id": client_id(*id), "client_secret": CLIENT_SECRET, "sites": [site_code(*id)]}))
        .collect();
    let sites: Vec<serde_json::Value> = projects
        .iter()
        .map(|id| json!({"id": id, "code": site_code(*id), "name": format!("Bench {id}")}))
        .collect();
    let seed = json!({
        "mixpanel": {
            "service_accounts": [{"username": USERNAME, "secret": SECRET, "projects": projects}],
            "projects": mixpanel_projects,
        },
        "kameleoon": {"clients": clients, "sites": sites},
    });
    Ok(Seed::parse(&serde_json::to_string(&seed)?)?)
}

/// Kameleoon site code of a project's site: ten lower-case letters or digits.
fn site_code(project: u64) -> String {
    if project == 1111 {
        SITE.to_string()
    } else {
        format!("bench{project:05}")
    }
}

fn client_id(project: u64) -> String {
    if project == 1111 {
        CLIENT_ID.to_string()
    } else {
        format!("{CLIENT_ID}-{project}")
    }
}

struct Standins {
    mixpanel: MixpanelStandin,
    kameleoon: KameleoonStandin,
}

async fn standins(projects: &[u64], mixpanel: MixpanelConfig) -> Result<Standins> {
    let seed = seed(projects)?;
    let kameleoon = KameleoonConfig {
        automation_rate_limits: false,
        ..KameleoonConfig::default()
    };
    Ok(Standins {
        mixpanel: MixpanelStandin::start(seed.mixpanel, mixpanel).await?,
        kameleoon: KameleoonStandin::start(seed.kameleoon, kameleoon).await?,
    })
}

fn unlimited() -> MixpanelConfig {
    MixpanelConfig {
        hourly_query_limit: 0,
        ..MixpanelConfig::default()
    }
}

fn connection_yaml(name: &str, project: u64, queries_per_hour: u32) -> String {
    let site = site_code(project);
    let client = client_id(project);
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: {name}-mixpanel}}
stringData: {{username: {USERNAME}, secret: {SECRET}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: {name}-kameleoon}}
stringData: {{clientId: {client}, clientSecret: {CLIENT_SECRET}}}
---
apiVersion: cohortsync.io/v1alpha1
kind: KameleoonConnection
metadata: {{name: {name}}}
spec:
  kameleoon:
    siteCode: {site}
    credentialsSecretRef: {{name: {name}-kameleoon}}
  mixpanel:
    projectId: {project}
    queriesPerHour: {queries_per_hour}
    credentialsSecretRef: {{name: {name}-mixpanel}}
"#
    )
}

fn sync_yaml(name: &str, connection: &str, custom_data: &str, sync_type: &str) -> String {
    format!(
        r#"
apiVersion: cohortsync.io/v1alpha1
kind: CohortSync
metadata: {{name: {name}}}
spec:
  connectionRef: {{name: {connection}}}
  cohort: {{id: {COHORT}}}
  syncType: {sync_type}
  customData: {{name: "{custom_data}"}}
"#
    )
}

fn spawn_operator(standins: &Standins, kubeconfig: &str, extra: &[&str]) -> Result<Operator> {
    let mixpanel = standins.mixpanel.url();
    let kameleoon = standins.kameleoon.url();
    let mut args = vec![
        "run",
        "--metrics-address",
        "127.0.0.1:0",
        "--health-address",
        "127.0.0.1:0",
        "--mixpanel-url",
        &mixpanel,
        "--kameleoon-api-url",
        &kameleoon,
        "--kameleoon-data-url",
        &kameleoon,
        "--log-level",
        "warn",
    ];
    args.extend_from_slice(extra);
    Operator::spawn(
        env!("CARGO_BIN_EXE_kameleoon-cohort-operator"),
        &args,
        &[("KUBECONFIG", kubeconfig)],
    )
}

/// Resident set size now, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    Ok(kib * 1024)
}

async fn wait_connected(
    api: &Api<kameleoon_cohort_operator::crd::KameleoonConnection>,
    name: &str,
) -> Result<()> {
    testkit::wait_condition(api, name, "Connected", "True", Duration::from_secs(120)).await?;
    Ok(())
}

async fn wait_exported(api: &Api<CohortSync>, name: &str, timeout: Duration) -> Result<CohortSync> {
    wait_until(timeout, &format!("{name} to export"), async || {
        let sync = api.get(name).await?;
        let status = sync.status.clone().unwrap_or_default();
        if status.last_exported_generation == sync.metadata.generation
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        {
            Ok(sync)
        } else {
            Err(anyhow::anyhow!(
                "not exported yet: {}",
                serde_json::to_string(&status.progress)?
            ))
        }
    })
    .await
}

/// Sum of the Data API line lengths that `ids` need, and the number of
/// lines. A body joins its lines with one byte each, so `r` requests carry at
/// least `sum + lines - r` bytes, and no exporter needs fewer requests than
/// `(sum + lines) / (max + 1)`, rounded up.
fn line_bytes<'a>(index: i64, ids: impl Iterator<Item = &'a String>) -> (u64, u64) {
    let mut bytes = 0u64;
    let mut lines = 0u64;
    for id in ids {
        bytes += events::line_len(index, true, id, MatchBy::VisitorCode) as u64;
        lines += 1;
    }
    (bytes, lines)
}

async fn export_size(
    cluster: &'static Cluster,
    size: u64,
    peer: bool,
) -> Result<serde_json::Value> {
    eprintln!("bench: exporting {size} profiles");
    let standins = standins(&[1111], unlimited()).await?;
    standins
        .mixpanel
        .set_cohort_generator(1111, COHORT, generator(size))?;
    let namespace = TempNamespace::new(cluster, "bench-export").await?;
    let ns = namespace.name().to_string();
    let kubeconfig = cluster.kubeconfig_path().to_string_lossy().to_string();
    let mut operator = spawn_operator(&standins, &kubeconfig, &["--namespace", &ns])?;
    cluster
        .apply(&ns, &connection_yaml("bench", 1111, 60))
        .await?;
    wait_connected(&Api::namespaced(cluster.client(), &ns), "bench").await?;

    let idle_rss = rss_bytes(operator.pid())?;
    let idle_cpu = operator.usage()?.cpu_time;
    let mixpanel_before = standins.mixpanel.requests().len();
    let kameleoon_before = standins.kameleoon.requests().len();
    let started = Instant::now();
    cluster
        .apply(&ns, &sync_yaml("export", "bench", "Benchmark", "OneTime"))
        .await?;
    let sync = wait_exported(
        &Api::namespaced(cluster.client(), &ns),
        "export",
        Duration::from_secs(1800),
    )
    .await?;
    let wall = started.elapsed();
    let usage = operator.usage()?;
    operator.terminate().await?;

    let status = sync.status.unwrap_or_default();
    let attempt = status.last_attempt.clone().unwrap_or_default();
    let export_seconds = match (&attempt.start_time, &attempt.completion_time) {
        (Some(start), Some(end)) => end.0.duration_since(start.0).as_secs_f64(),
        _ => f64::NAN,
    };
    let mixpanel_requests: Vec<_> = standins
        .mixpanel
        .requests()
        .into_iter()
        .skip(mixpanel_before)
        .collect();
    let engage = mixpanel_requests
        .iter()
        .filter(|r| r.path.ends_with("/engage"))
        .count();
    let cohort_lists = mixpanel_requests
        .iter()
        .filter(|r| r.path.ends_with("/cohorts/list"))
        .count();
    let kameleoon_requests: Vec<_> = standins
        .kameleoon
        .requests()
        .into_iter()
        .skip(kameleoon_before)
        .collect();
    let events: Vec<_> = kameleoon_requests
        .iter()
        .filter(|r| r.path == "/visit/events")
        .collect();
    let event_bytes: u64 = events.iter().map(|r| r.body_bytes).sum();
    let automation = kameleoon_requests.len() - events.len();

    let profiles = standins
        .mixpanel
        .cohort_members(1111, COHORT)?
        .iter()
        .filter(|m| m.properties.is_some())
        .count() as u64;
    let custom_data = standins
        .kameleoon
        .custom_data_named(SITE, "Benchmark")?
        .expect("custom data exists");
    let values = standins.kameleoon.state(SITE, custom_data.index)?;
    let members = values.with_value(IdentifierKind::VisitorCode, "true");
    let (line_sum, lines) = line_bytes(i64::from(custom_data.index), members.iter());
    let max = events::MAX_BODY_BYTES as u64;
    let requests_needed = (line_sum + lines).div_ceil(max + 1);
    let sent = events.len() as u64;
    let pages_needed = profiles / 1000 + 1;

    let peer_result = if peer {
        Some(run_peer(&standins, size).await?)
    } else {
        None
    };
    Ok(json!({
        "profiles_generated": size,
        "profiles_with_profile": profiles,
        "members_exported": status.members,
        "lines_in_kameleoon": lines,
        "wall_seconds_apply_to_ready": wall.as_secs_f64(),
        "export_seconds": export_seconds,
        "operator_cpu_seconds": (usage.cpu_time - idle_cpu).as_secs_f64(),
        "operator_idle_rss_mib": idle_rss as f64 / 1048576.0,
        "operator_peak_rss_mib": usage.peak_rss_bytes as f64 / 1048576.0,
        "operator_peak_above_idle_mib": usage.peak_rss_bytes.saturating_sub(idle_rss) as f64 / 1048576.0,
        "mixpanel_engage_requests": engage,
        "mixpanel_cohort_list_requests": cohort_lists,
        "mixpanel_lower_bound": format!("{pages_needed} pages + at most 1 cohort lookup"),
        "kameleoon_event_requests": events.len(),
        "kameleoon_event_bytes": event_bytes,
        "kameleoon_lower_bound_requests": requests_needed,
        "kameleoon_bytes_needed_for_these_requests": (line_sum + lines).saturating_sub(sent),
        "kameleoon_automation_requests": automation,
        "peer": peer_result,
    }))
}

async fn run_peer(standins: &Standins, size: u64) -> Result<serde_json::Value> {
    eprintln!("bench: running the peer script on {size} profiles");
    let python = std::env::var("BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = testkit::repo_root().join("benches/peer/export_cohort.py");
    let kameleoon = standins.kameleoon.url();
    let output = tokio::task::spawn_blocking({
        let mixpanel = standins.mixpanel.url();
        move || {
            Command::new(python)
                .arg(script)
                .env("MIXPANEL_URL", mixpanel)
                .env("MIXPANEL_PROJECT", "1111")
                .env("MIXPANEL_COHORT", COHORT.to_string())
                .env("MIXPANEL_USERNAME", USERNAME)
                .env("MIXPANEL_SECRET", SECRET)
                .env("KAMELEOON_API_URL", &kameleoon)
                .env("KAMELEOON_DATA_URL", &kameleoon)
                .env("KAMELEOON_CLIENT_ID", CLIENT_ID)
                .env("KAMELEOON_CLIENT_SECRET", CLIENT_SECRET)
                .env("KAMELEOON_SITE_CODE", SITE)
                .env("KAMELEOON_CUSTOM_DATA", "Benchmark (script)")
                .output()
        }
    })
    .await??;
    if !output.status.success() {
        anyhow::bail!(
            "the peer script failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8(output.stdout)?;
    let last = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow::anyhow!("the peer script printed nothing"))?;
    Ok(serde_json::from_str(last)?)
}

/// Exports `size` profiles with the hourly query limit on, every page
/// counted, and the window shortened to 10 seconds on both sides, and
/// compares the export's duration with the least the limit allows.
async fn rate_limited(cluster: &'static Cluster, size: u64) -> Result<serde_json::Value> {
    const WINDOW: Duration = Duration::from_secs(10);
    const PER_WINDOW: u32 = 20;
    eprintln!("bench: exporting {size} profiles at {PER_WINDOW} queries per {WINDOW:?}");
    let config = MixpanelConfig {
        hourly_query_limit: PER_WINDOW,
        count_follow_up_pages: true,
        query_window_ms: WINDOW.as_millis() as u64,
        ..MixpanelConfig::default()
    };
    let standins = standins(&[1111], config).await?;
    standins
        .mixpanel
        .set_cohort_generator(1111, COHORT, generator(size))?;
    let namespace = TempNamespace::new(cluster, "bench-limited").await?;
    let ns = namespace.name().to_string();
    let kubeconfig = cluster.kubeconfig_path().to_string_lossy().to_string();
    let mut operator = spawn_operator(
        &standins,
        &kubeconfig,
        &[
            "--namespace",
            &ns,
            "--count-follow-up-pages",
            "--test-query-window",
            "10s",
        ],
    )?;
    cluster
        .apply(&ns, &connection_yaml("bench", 1111, PER_WINDOW))
        .await?;
    wait_connected(&Api::namespaced(cluster.client(), &ns), "bench").await?;
    cluster
        .apply(&ns, &sync_yaml("export", "bench", "Benchmark", "OneTime"))
        .await?;
    wait_exported(
        &Api::namespaced(cluster.client(), &ns),
        "export",
        Duration::from_secs(1800),
    )
    .await?;
    operator.terminate().await?;

    // Every counted query: the connection's cohort list and each page.
    let counted: Vec<u64> = standins
        .mixpanel
        .requests()
        .iter()
        .filter(|r| {
            r.status == 200 && (r.path.ends_with("/engage") || r.path.ends_with("/cohorts/list"))
        })
        .map(|r| r.started_at_ms)
        .collect();
    let first = *counted.first().unwrap_or(&0);
    let last = *counted.last().unwrap_or(&0);
    let n = counted.len() as u64;
    // Query k (from 0) cannot start before (k / limit) windows after the first.
    let floor_ms = (n.saturating_sub(1) / u64::from(PER_WINDOW)) * WINDOW.as_millis() as u64;
    let rejected = standins
        .mixpanel
        .project_stats(1111)
        .map(|s| s.rejected_hourly + s.rejected_concurrent)
        .unwrap_or(0);
    let actual_ms = last - first;
    Ok(json!({
        "profiles_generated": size,
        "queries_per_window": PER_WINDOW,
        "window_seconds": WINDOW.as_secs(),
        "counted_queries": n,
        "floor_seconds": floor_ms as f64 / 1000.0,
        "actual_seconds": actual_ms as f64 / 1000.0,
        "over_floor_percent": if floor_ms > 0 { (actual_ms as f64 / floor_ms as f64 - 1.0) * 100.0 } else { 0.0 },
        "mixpanel_429": rejected,
    }))
}

/// Creates `syncs` CohortSyncs across `namespaces` namespaces, waits until
/// every one exported, then measures the operator at rest: memory, requests
/// to the API server per minute (from its audit log), and that a restart
/// starts no export before its time.
async fn scale(
    cluster: &'static Cluster,
    syncs: usize,
    namespaces: usize,
    window: Duration,
) -> Result<serde_json::Value> {
    eprintln!("bench: {syncs} CohortSyncs in {namespaces} namespaces");
    let audit_log = std::env::var("KCO_APISERVER_AUDIT_LOG").map_err(|_| {
        anyhow::anyhow!(
            "the scale run counts API requests from the audit log: run it through hack/bench.sh"
        )
    })?;
    let projects: Vec<u64> = (0..namespaces as u64).map(|i| 2000 + i).collect();
    let standins = standins(&projects, unlimited()).await?;
    for project in &projects {
        standins
            .mixpanel
            .set_cohort_generator(*project, COHORT, generator(20))?;
    }
    let mut spaces = Vec::new();
    for (i, project) in projects.iter().enumerate() {
        let namespace = TempNamespace::new(cluster, "bench-scale").await?;
        let mut yaml = connection_yaml("bench", *project, 100_000);
        for j in 0..syncs.div_ceil(namespaces) {
            if i * syncs.div_ceil(namespaces) + j >= syncs {
                break;
            }
            yaml.push_str("\n---\n");
            yaml.push_str(&sync_yaml(
                &format!("sync-{j}"),
                "bench",
                &format!("Benchmark {i}-{j}"),
                "Dynamic",
            ));
        }
        cluster.apply(namespace.name(), &yaml).await?;
        spaces.push(namespace);
    }

    // The operator authenticates as its own service account so that the
    // audit log tells its requests apart. Existing objects from an earlier
    // run are fine, so the results of these commands are not checked.
    for args in [
        &["create", "namespace", "bench-operator"][..],
        &[
            "create",
            "serviceaccount",
            "-n",
            "bench-operator",
            "operator",
        ],
        &[
            "create",
            "clusterrolebinding",
            "bench-operator",
            "--clusterrole=cluster-admin",
            "--serviceaccount=bench-operator:operator",
        ],
    ] {
        cluster.kubectl(args, None).await?;
    }
    let kubeconfig = cluster
        .service_account_kubeconfig("bench-operator", "operator")
        .await?;
    let kubeconfig = kubeconfig.to_string_lossy().to_string();
    let user = "system:serviceaccount:bench-operator:operator";

    let started = Instant::now();
    let started_ms = chrono_now_ms();
    let mut operator = spawn_operator(&standins, &kubeconfig, &[])?;
    let api: Api<CohortSync> = Api::all(cluster.client());
    let ready_count = || async {
        let list = api.list(&ListParams::default()).await?;
        Ok::<_, anyhow::Error>(
            list.items
                .iter()
                .filter(|s| {
                    s.metadata
                        .namespace
                        .as_deref()
                        .is_some_and(|n| n.starts_with("bench-scale"))
                })
                .filter(|s| {
                    s.status
                        .as_ref()
                        .is_some_and(|st| st.last_successful_sync_time.is_some())
                })
                .count(),
        )
    };
    wait_until(
        Duration::from_secs(1800),
        &format!("{syncs} syncs to export"),
        async || {
            let ready = ready_count().await?;
            if ready >= syncs {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{ready} of {syncs} exported"))
            }
        },
    )
    .await?;
    let first_exports = started.elapsed();
    let first_exports_requests = audit_requests(&audit_log, user, started_ms, chrono_now_ms())?;

    // At rest: let watches settle for a third of the window, then count
    // the requests of one window.
    tokio::time::sleep(window / 3).await;
    let rest_rss = rss_bytes(operator.pid())?;
    let from = chrono_now_ms();
    tokio::time::sleep(window).await;
    let to = chrono_now_ms();
    let requests = audit_requests(&audit_log, user, from, to)?;
    let rest_rss_after = rss_bytes(operator.pid())?;

    // Restart: every sync is due in two hours, so nothing may be exported.
    operator.terminate().await?;
    let engage_before = standins
        .mixpanel
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/engage"))
        .count();
    let restarted_ms = chrono_now_ms();
    let mut operator = spawn_operator(&standins, &kubeconfig, &[])?;
    tokio::time::sleep(window).await;
    let restart_requests = audit_requests(&audit_log, user, restarted_ms, chrono_now_ms())?;
    let engage_after = standins
        .mixpanel
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/engage"))
        .count();
    let restart_rss = rss_bytes(operator.pid())?;
    operator.terminate().await?;

    let writes: u64 = requests
        .iter()
        .filter(|(verb, _)| matches!(verb.as_str(), "create" | "update" | "patch" | "delete"))
        .map(|(_, n)| n)
        .sum();
    let total: u64 = requests.values().sum();
    drop(spaces);
    Ok(json!({
        "syncs": syncs,
        "namespaces": namespaces,
        "first_exports_seconds": first_exports.as_secs_f64(),
        "rest_rss_mib": rest_rss as f64 / 1048576.0,
        "rest_rss_after_minute_mib": rest_rss_after as f64 / 1048576.0,
        "api_requests_per_minute_at_rest": total as f64 * 60.0 / window.as_secs_f64(),
        "api_writes_per_minute_at_rest": writes as f64 * 60.0 / window.as_secs_f64(),
        "api_requests_by_verb_at_rest": requests,
        "api_requests_by_verb_during_first_exports": first_exports_requests,
        "api_requests_by_verb_after_restart": restart_requests,
        "exports_in_minute_after_restart": engage_after - engage_before,
        "restart_rss_mib": restart_rss as f64 / 1048576.0,
    }))
}

fn chrono_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counts the requests `user` sent between two times, by verb, from the API
/// server's JSON audit log.
fn audit_requests(
    path: &str,
    user: &str,
    from_ms: u64,
    to_ms: u64,
) -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(path)?;
    let mut counts = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if event["user"]["username"] != user {
            continue;
        }
        let received = event["requestReceivedTimestamp"]
            .as_str()
            .unwrap_or_default();
        let Ok(time) = received.parse::<k8s_openapi::jiff::Timestamp>() else {
            continue;
        };
        let ms = time.as_millisecond() as u64;
        if ms < from_ms || ms >= to_ms {
            continue;
        }
        let id = event["auditID"].as_str().unwrap_or_default().to_string();
        if !seen.insert(id) {
            continue;
        }
        *counts
            .entry(event["verb"].as_str().unwrap_or("unknown").to_string())
            .or_insert(0) += 1;
    }
    Ok(counts)
}
