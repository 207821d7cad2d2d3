#![allow(clippy::tests_outside_test_module)]
//! Fails on any dependency edge between workspace crates that HOUSE-STYLE.md §1 does not
//! allow, and on any crate other than hv-runner depending on kvm-ioctls.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// The allowed (non-dev) edges between workspace packages.
fn allowed() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let table: [(&str, &[&str]); 8] = [
        ("block-client", &[]),
        ("journal", &["block-client"]),
        ("redirect-io", &["block-client"]),
        (
            "metadata-server",
            &["block-client", "journal", "redirect-io"],
        ),
        ("csvfs", &["metadata-server", "redirect-io", "block-client"]),
        (
            "csvfs-tools",
            &["metadata-server", "journal", "block-client"],
        ),
        ("hv-runner", &[]),
        (
            "csvfs-tests",
            &[
                "block-client",
                "journal",
                "redirect-io",
                "metadata-server",
                "csvfs",
                "csvfs-tools",
                "hv-runner",
            ],
        ),
    ];
    table
        .into_iter()
        .map(|(k, v)| (k, v.iter().copied().collect()))
        .collect()
}

#[test]
fn dependency_edges_follow_the_layer_table() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("parse metadata");
    let packages = meta["packages"].as_array().expect("packages array");
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_string())
        .collect();
    let allowed = allowed();
    let mut violations = Vec::new();
    for p in packages {
        let name = p["name"].as_str().expect("name");
        let Some(ok) = allowed.get(name) else {
            violations.push(format!("{name} is not in the layer table"));
            continue;
        };
        for dep in p["dependencies"].as_array().expect("dependencies") {
            let dep_name = dep["name"].as_str().expect("dep name");
            let is_dev = dep["kind"].as_str() == Some("dev");
            if dep_name == "kvm-ioctls" && name != "hv-runner" {
                violations.push(format!("{name} -> kvm-ioctls (only hv-runner may)"));
            }
            if !names.contains(dep_name) {
                continue;
            }
            if name == "csvfs-tests" {
                continue; // tests may use anything
            }
            if is_dev || !ok.contains(dep_name) {
                if is_dev && ok.contains(dep_name) {
                    continue;
                }
                violations.push(format!("{name} -> {dep_name}"));
            }
        }
    }
    assert!(violations.is_empty(), "forbidden edges: {violations:?}");
}
