//! The checked-in CRDs must be exactly what the Rust types generate.

use std::path::Path;

#[test]
fn checked_in_crds_match_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let files = kameleoon_cohort_operator::crd::definition_files().expect("CRDs render");
    for (name, expected) in &files {
        let actual = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| {
            panic!("crds/{name} is missing ({e}); run: cargo run -- crds --output-dir crds")
        });
        assert!(
            actual == *expected,
            "crds/{name} differs from the Rust types; run: cargo run -- crds --output-dir crds"
        );
    }
    let on_disk = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        on_disk,
        files.len(),
        "crds/ holds files that the Rust types do not generate"
    );
}

#[test]
fn chart_crds_match_checked_in_crds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart = root.join("charts/kameleoon-cohort-operator/crds");
    let files = kameleoon_cohort_operator::crd::definition_files().unwrap();
    for (name, expected) in &files {
        let actual = std::fs::read_to_string(chart.join(name)).unwrap_or_default();
        assert!(
            actual == *expected,
            "the chart's crds/{name} differs; copy crds/{name} into the chart"
        );
    }
    let in_chart = std::fs::read_dir(&chart).unwrap().count();
    assert_eq!(
        in_chart,
        files.len(),
        "the chart's crds/ holds files that crds/ does not"
    );
}
