//! docs/operations.md lists every public operation with its Rust, C and Python names; each name
//! must exist in its face: the C header, the Python stubs, llama-core's public functions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The `backticked` names of a table cell (`—`: none).
fn names(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Identifiers declared in the C header: functions, structs, typedefs and enum constants.
fn c_names(header: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in header.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("llama_") || word.starts_with("LLAMA_") {
            out.insert(word.to_string());
        }
    }
    out
}

fn c_functions(header: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in header.lines() {
        let l = line.trim_start();
        if l.starts_with('*') || l.starts_with("/*") || l.starts_with("//") {
            continue;
        }
        if let Some(p) = l.find('(') {
            if let Some(name) = l[..p]
                .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
            {
                if name.starts_with("llama_") {
                    out.insert(name.to_string());
                }
            }
        }
    }
    out
}

/// `Class -> {methods and properties}` from the stubs.
fn py_names(stub: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut class = String::new();
    for line in stub.lines() {
        if let Some(rest) = line.strip_prefix("class ") {
            class = rest
                .split(['(', ':'])
                .next()
                .unwrap_or_default()
                .to_string();
        } else if let Some(rest) = line.strip_prefix("    def ") {
            let name = rest.split('(').next().unwrap_or_default().to_string();
            out.entry(class.clone()).or_default().insert(name);
        } else if let Some(rest) = line.strip_prefix("def ") {
            // A module-level function: listed without a class.
            class.clear();
            let name = rest.split('(').next().unwrap_or_default().to_string();
            out.entry(String::new()).or_default().insert(name);
        } else if !line.starts_with(' ') && !line.is_empty() {
            class.clear();
        }
    }
    out
}

/// Public function names of llama-core (`pub fn name` anywhere in its sources).
fn rust_functions() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for part in text.split("pub fn ").skip(1) {
                    let name: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    out.insert(name);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root().join("llama-core/src"), &mut out);
    out
}

#[test]
fn every_operation_in_the_table_exists_in_each_face() {
    let table = read("docs/operations.md");
    let header = read("include/llama.h");
    let (c_all, c_fns) = (c_names(&header), c_functions(&header));
    let py = py_names(&read("llama-py/python/llama_core/_native.pyi"));
    let rust = rust_functions();
    let mut rows = 0;
    let mut missing = vec![];
    for line in table
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains('`'))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", operation, rust, c, python, note, ""]
        assert!(cells.len() >= 6, "malformed row: {line}");
        let (op, r, c, p) = (cells[1], cells[2], cells[3], cells[4]);
        rows += 1;
        for cell in [r, c, p] {
            assert!(
                !names(cell).is_empty() || cell == "—",
                "{op}: a cell is neither names nor `—`"
            );
        }
        for n in names(r) {
            let f = n.rsplit("::").next().unwrap_or(&n);
            if !rust.contains(f) {
                missing.push(format!("{op}: Rust `{n}`"));
            }
        }
        for n in names(c) {
            let ok = if n.chars().any(|ch| ch.is_ascii_uppercase()) || n.ends_with("_info") {
                c_all.contains(&n)
            } else {
                c_fns.contains(&n)
            };
            if !ok {
                missing.push(format!("{op}: C `{n}`"));
            }
        }
        for n in names(p) {
            let (class, attr) = n.split_once('.').unwrap_or(("", &n));
            if !py.get(class).is_some_and(|m| m.contains(attr)) {
                missing.push(format!("{op}: Python `{n}`"));
            }
        }
    }
    assert!(rows >= 30, "only {rows} operations in the table");
    assert!(
        missing.is_empty(),
        "missing from their faces:\n{}",
        missing.join("\n")
    );
    // The checker itself finds what is there and misses what is not.
    assert!(c_fns.contains("llama_session_eval") && !c_fns.contains("llama_session_nope"));
    assert!(py["Session"].contains("eval") && !py["Session"].contains("nope"));
    assert!(rust.contains("top_logprobs") && !rust.contains("nope_nope"));
}

/// Every exported C function appears in the table (a new export needs a row).
#[test]
fn every_c_function_has_a_row() {
    let table = read("docs/operations.md");
    let header = read("include/llama.h");
    let listed: BTreeSet<String> = table
        .lines()
        .filter(|l| l.starts_with("| "))
        .flat_map(names)
        .collect();
    // Plumbing every C object has: defaults, free functions, status and version calls.
    let plumbing = |f: &str| {
        f.ends_with("_default")
            || f.ends_with("_free")
            || matches!(
                f,
                "llama_status_str"
                    | "llama_last_error_message"
                    | "llama_version"
                    | "llama_version_number"
            )
    };
    let unlisted: Vec<String> = c_functions(&header)
        .into_iter()
        .filter(|f| !plumbing(f) && !listed.contains(f))
        .filter(|f| header.contains(&format!("{f}(")))
        .collect();
    assert!(
        unlisted.is_empty(),
        "C functions without a row in docs/operations.md: {unlisted:?}"
    );
}
