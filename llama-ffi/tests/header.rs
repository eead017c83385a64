//! The checked-in header's version macros match Cargo's version.

#[test]
fn header_version_macros_match_cargo() {
    let header =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../include/llama.h"))
            .unwrap();
    let get = |name: &str| -> u32 {
        let line = header
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} missing"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let v: Vec<u32> = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(
        [
            get("LLAMA_VERSION_MAJOR"),
            get("LLAMA_VERSION_MINOR"),
            get("LLAMA_VERSION_PATCH")
        ],
        [v[0], v[1], v[2]]
    );
    assert!(header.contains("#define LLAMA_VERSION_NUMBER (LLAMA_VERSION_MAJOR * 1000000 + LLAMA_VERSION_MINOR * 1000 + LLAMA_VERSION_PATCH)"));
    assert_eq!(
        llama::llama_version_number(),
        v[0] * 1_000_000 + v[1] * 1000 + v[2]
    );
}

#[test]
fn every_exported_function_is_declared() {
    let header =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../include/llama.h"))
            .unwrap();
    let src_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    for f in std::fs::read_dir(src_dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        for line in text.lines() {
            let l = line.trim();
            if let Some(rest) = l
                .strip_prefix("pub unsafe extern \"C\" fn ")
                .or_else(|| l.strip_prefix("pub extern \"C\" fn "))
            {
                let name = rest.split('(').next().unwrap();
                assert!(
                    header.contains(&format!("{name}(")),
                    "{name} is not in include/llama.h"
                );
                assert!(name.starts_with("llama_"), "{name} lacks the llama_ prefix");
            }
        }
    }
}
