//! The tests crate's build script: first checks that every on-target test file has its
//! `[[test]]` entry (a file without one is built with libtest's harness, which does not
//! exist for `aarch64-unknown-none`: rustc would only say `E0463: can't find crate for
//! 'test'`), then links like the firmware (`../firmware/build.rs`).

#[path = "../firmware/build.rs"]
mod firmware_build;

use std::path::Path;

/// The `name = "..."` of every `[[test]]` table of `manifest` that says `harness = false`.
fn harnessless_tests(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_test = false;
    let (mut name, mut no_harness) = (None::<String>, false);
    let mut flush = |name: &mut Option<String>, no_harness: &mut bool| {
        if let Some(n) = name.take() {
            if *no_harness {
                out.push(n);
            }
        }
        *no_harness = false;
    };
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            flush(&mut name, &mut no_harness);
            in_test = line == "[[test]]";
            continue;
        }
        if !in_test {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim().trim_matches('"');
        match key.trim() {
            "name" => name = Some(value.to_string()),
            "harness" => no_harness = value == "false",
            _ => {}
        }
    }
    flush(&mut name, &mut no_harness);
    out
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest_path = dir.join("Cargo.toml");
    let tests_dir = dir.join("tests");
    println!("cargo:rerun-if-changed={}", manifest_path.display());
    println!("cargo:rerun-if-changed={}", tests_dir.display());
    let manifest = std::fs::read_to_string(&manifest_path).expect("tests/Cargo.toml");
    let declared = harnessless_tests(&manifest);
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&tests_dir).expect("tests/tests").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            if !declared.contains(&stem) {
                missing.push(stem);
            }
        }
    }
    missing.sort();
    if !missing.is_empty() {
        eprintln!("error: every file of tests/tests/ is an on-target image and needs a harness-less test target.");
        eprintln!("Add to tests/Cargo.toml:");
        for m in &missing {
            eprintln!("\n[[test]]\nname = \"{m}\"\nharness = false");
        }
        eprintln!("\n(without it cargo builds the file with libtest, which aarch64-unknown-none lacks: E0463)");
        std::process::exit(1);
    }
    firmware_build::main();
}
