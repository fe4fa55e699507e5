//! The `standins` binary: flags, the URLs file and the control API from another process.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{USER_AGENT, client, form_encode, json_of};
use serde_json::{Value, json};

/// Kills the child process when the test ends, also on failure.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("standins-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn example_seed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seed.example.yaml")
}

async fn wait_for_urls(path: &PathBuf, child: &mut ChildGuard) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).expect("URLs file is JSON");
        }
        if let Some(status) = child.0.try_wait().expect("child status") {
            panic!("standins exited early with {status}");
        }
        assert!(Instant::now() < deadline, "no URLs file after 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn binary_serves_seed_and_control_api() {
    let dir = scratch_dir("run");
    let urls_file = dir.join("urls.json");
    let child = Command::new(env!("CARGO_BIN_EXE_standins"))
        .arg("--seed")
        .arg(example_seed())
        .arg("--urls-file")
        .arg(&urls_file)
        .args([
            "--mixpanel-page-size",
            "2",
            "--no-rate-limits",
            "--kameleoon-body-limit",
            "4096",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary starts");
    let mut child = ChildGuard(child);
    let urls = wait_for_urls(&urls_file, &mut child).await;
    let mixpanel = urls["mixpanel"].as_str().expect("mixpanel URL").to_string();
    let kameleoon = urls["kameleoon"]
        .as_str()
        .expect("kameleoon URL")
        .to_string();
    assert!(mixpanel.starts_with("http://127.0.0.1:"));
    assert_eq!(urls["kameleoon_data"], urls["kameleoon_automation"]);

    let client = client();
    for base in [&mixpanel, &kameleoon] {
        let health = client
            .get(format!("{base}/_standin/health"))
            .send()
            .await
            .expect("answer");
        assert_eq!(health.status(), 200);
    }
    let config = json_of(
        client
            .get(format!("{mixpanel}/_standin/config"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(config["page_size"], 2);
    assert_eq!(config["hourly_query_limit"], 0);
    let km_config = json_of(
        client
            .get(format!("{kameleoon}/_standin/config"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(km_config["automation_rate_limits"], false);
    assert_eq!(km_config["events_body_limit_bytes"], 4096);

    let page = client
        .post(format!("{mixpanel}/api/query/engage?project_id=1111"))
        .basic_auth("growth-sync.1a2b3c.mp-service-account", Some("mp-secret-1"))
        .form(&[
            ("filter_by_cohort", r#"{"id":501}"#),
            ("include_all_users", "false"),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(page.status(), 200);
    let page = json_of(page).await;
    assert_eq!(page["total"], 3);
    assert_eq!(page["results"].as_array().expect("results").len(), 2);

    let token = json_of(
        client
            .post(format!("{kameleoon}/oauth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "growth-operator"),
                ("client_secret", "km-secret-1"),
            ])
            .send()
            .await
            .expect("answer"),
    )
    .await["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let line = form_encode(&[
        ("eventType", "customData"),
        ("index", "0"),
        ("valuesCountMap", r#"{"crm-200":1}"#),
        ("overwrite", "true"),
        ("nonce", "00000000000000AA"),
        ("visitorCode", "u-200"),
    ]);
    let events = client
        .post(format!("{kameleoon}/visit/events?siteCode=abc123xyz0"))
        .bearer_auth(&token)
        .header("user-agent", USER_AGENT)
        .body(line)
        .send()
        .await
        .expect("answer");
    assert_eq!(events.status(), 204);
    let values = json_of(
        client
            .get(format!(
                "{kameleoon}/_standin/sites/abc123xyz0/custom-datas/0/values"
            ))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(
        values,
        json!({"total": 1, "values": {"u-200": ["crm-200"]}})
    );

    let too_big = client
        .post(format!("{kameleoon}/visit/events?siteCode=abc123xyz0"))
        .bearer_auth(&token)
        .body("x".repeat(5000))
        .send()
        .await
        .expect("answer");
    assert_eq!(too_big.status(), 413);
    drop(child);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn binary_rejects_invalid_seed() {
    let dir = scratch_dir("bad-seed");
    let seed = dir.join("seed.yaml");
    std::fs::write(&seed, "mixpanel:\n  projectz: []\n").expect("write seed");
    let output = Command::new(env!("CARGO_BIN_EXE_standins"))
        .arg("--seed")
        .arg(&seed)
        .output()
        .expect("binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("projectz"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn binary_rejects_public_address() {
    let output = Command::new(env!("CARGO_BIN_EXE_standins"))
        .args(["--mixpanel-addr", "0.0.0.0:0"])
        .output()
        .expect("binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}
