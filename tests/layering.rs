//! The crate's layering, as docs/architecture.md states it: every `crate::`
//! path in a module's code (`use` lines, grouped imports and inline paths
//! alike) must name a module its row of the rule table allows. Unit tests
//! (`#[cfg(test)]` modules and `tests.rs` files) may use anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The rule table: module -> modules it may use.
fn rules() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/architecture.md"))
        .expect("docs/architecture.md");
    let mut rules = BTreeMap::new();
    let mut in_table = false;
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 4 && cells[1] == "module" && cells[2] == "may use" {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if !line.starts_with('|') {
            break;
        }
        if cells[1].starts_with("---") {
            continue;
        }
        let names = |c: &str| -> BTreeSet<String> {
            c.split(',')
                .map(|s| s.trim().trim_matches('`').to_string())
                .filter(|s| !s.is_empty() && s != "-")
                .collect()
        };
        for m in names(cells[1]) {
            rules.insert(m, names(cells[2]));
        }
    }
    assert!(
        !rules.is_empty(),
        "docs/architecture.md has no `| module | may use |` table"
    );
    rules
}

/// Items the crate root re-exports, by name: the module they come from.
fn root_items() -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(Path::new(ROOT).join("src/lib.rs")).expect("src/lib.rs");
    let mut items = BTreeMap::new();
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, list)) = rest.split_once("::") else {
            continue;
        };
        for item in list.trim_matches(|c| c == '{' || c == '}').split(',') {
            let item = item.trim();
            if !item.is_empty() {
                items.insert(item.to_string(), module.trim().to_string());
            }
        }
    }
    items
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's code without comments and without its unit tests.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The first path segment of every `crate::` path in `code`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // `crate::{a, b::c, D}`: every entry's first segment (nested
            // groups only go deeper into one of them).
            let mut depth = 1;
            let mut entry = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        found.insert(first_segment(&entry));
                        entry.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 {
                    entry.push(ch);
                }
            }
            found.insert(first_segment(&entry));
        } else {
            found.insert(first_segment(after));
        }
        rest = after;
    }
    found.remove("");
    found
}

fn first_segment(s: &str) -> String {
    s.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn every_module_uses_only_what_the_rule_table_allows() {
    let rules = rules();
    let items = root_items();
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    let mut unlisted = BTreeSet::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        if rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let module = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("module name");
        if module == "lib" {
            continue;
        }
        let Some(allowed) = rules.get(&module) else {
            unlisted.insert(module);
            continue;
        };
        let text = std::fs::read_to_string(&f).expect("read");
        for used in crate_paths(&code(&text)) {
            let target = items.get(&used).cloned().unwrap_or(used.clone());
            if target != module && !allowed.contains(&target) {
                broken.push(format!(
                    "{}: uses crate::{used} ({target}), which the table does not allow {module}",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "modules missing from the rule table in docs/architecture.md: {unlisted:?}"
    );
    assert!(
        broken.is_empty(),
        "layering broken (see the rule table in docs/architecture.md):\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_scanner_finds_grouped_inline_and_nested_paths() {
    let code = code(
        "use crate::{a, b::c, D};\n\
         use crate::e::{f, g};\n\
         let x = crate::h::i();\n\
         // crate::not_this\n\
         use crate::{j::{k, l}, m};\n\
         #[cfg(test)]\n\
         mod tests { use crate::neither; }\n",
    );
    let found: Vec<String> = crate_paths(&code).into_iter().collect();
    assert_eq!(found, ["D", "a", "b", "e", "h", "j", "m"]);
}
