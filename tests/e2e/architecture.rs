//! The userspace's shape, checked (ARCHITECTURE.md states the rules): the
//! modules of `natfix/src` import each other without a cycle, only the CLI
//! knows clap, and no product file or function outgrows a reader.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 80;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../natfix/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (top-level module, file text without its `#[cfg(test)]` module) of every product file.
fn product_files() -> Vec<(String, PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "tests.rs"))
        .map(|p| {
            let rel = p.strip_prefix(src()).unwrap();
            let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
            let module = first.trim_end_matches(".rs").to_owned();
            let text = std::fs::read_to_string(&p).unwrap();
            let product = text.split("\n#[cfg(test)]\nmod tests").next().unwrap().to_owned();
            (module, p, product)
        })
        .collect()
}

/// Which top-level modules each top-level module names (`crate::X`, or `super::X` from a file directly in a folder module).
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = product_files();
    let modules: BTreeSet<String> = files.iter().map(|(m, _, _)| m.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, _, text) in &files {
        let edges = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if modules.contains(&name) && &name != module {
                edges.insert(name);
            }
        }
        // `use crate::{a, b::c}` groups.
        for (i, _) in text.match_indices("crate::{") {
            let group = &text[i + "crate::{".len()..];
            let mut depth = 0;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    c if c.is_alphanumeric() || c == '_' => {
                        word.push(c);
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && modules.contains(&word) && &word != module && (c == ':' || c == ',' || c == '}') {
                    edges.insert(word.clone());
                }
                word.clear();
            }
            if depth == 0 && modules.contains(&word) && &word != module {
                edges.insert(word);
            }
        }
    }
    graph
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = import_graph();
    assert!(graph.len() > 10, "found the modules: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}\n{graph:#?}", cycle.join(" -> "));
    }
    // The check finds cycles: a made-up back edge is one.
    let mut broken = graph.clone();
    broken.get_mut("config").unwrap().insert("commands".into());
    assert!(find_cycle(&broken).is_some(), "{broken:?}");
}

/// The one command below the CLI that takes clap's types: it renders the
/// CLI's definition itself (completion scripts, man pages), handed to it by
/// `main` from `cli::command()`. It still does not import `cli`.
const RENDERS_THE_CLI: &str = "commands/completions.rs";

#[test]
fn only_the_cli_knows_clap() {
    for (module, path, text) in product_files() {
        let renders_cli = path.ends_with(RENDERS_THE_CLI);
        if module == "cli" || module == "main" {
            continue;
        }
        if !renders_cli {
            assert!(!text.contains("clap::") && !text.contains("use clap"), "{} uses clap: only cli.rs and main.rs may", path.display());
        }
        assert!(!text.contains("crate::cli"), "{} imports the CLI", path.display());
    }
    assert!(src().join(RENDERS_THE_CLI).exists(), "{RENDERS_THE_CLI} moved: update the exception");
}

/// Strips string and char literals and comments, so braces in them do not count.
fn code_only(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_str => {
                chars.next();
            }
            '"' => in_str = !in_str,
            '/' if !in_str && chars.peek() == Some(&'/') => break,
            '\'' if !in_str => {
                // A char literal ('x', '\n') or a lifetime ('a).
                let rest: String = chars.clone().take(3).collect();
                if rest.chars().nth(1) == Some('\'') || rest.starts_with('\\') {
                    for n in chars.by_ref() {
                        if n == '\'' {
                            break;
                        }
                    }
                }
            }
            _ if !in_str => out.push(c),
            _ => {}
        }
    }
    out
}

/// (name, lines) of every function in `text`.
fn functions(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = code_only(line);
        let trimmed = code.trim_start();
        let Some(at) = trimmed.find("fn ") else { continue };
        let before = &trimmed[..at];
        if !before.split_whitespace().all(|w| ["pub", "pub(crate)", "pub(super)", "const", "async", "unsafe", "extern"].contains(&w)) {
            continue;
        }
        let name: String = trimmed[at + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let mut depth = 0i32;
        let mut opened = false;
        for (j, l) in lines.iter().enumerate().skip(i) {
            for c in code_only(l).chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break,
                    _ => {}
                }
            }
            if (opened && depth == 0) || (!opened && code_only(l).trim_end().ends_with(';')) {
                if opened {
                    out.push((name.clone(), j - i + 1));
                }
                break;
            }
        }
    }
    out
}

#[test]
fn no_product_file_or_function_is_too_long() {
    let mut too_long = Vec::new();
    for (_, path, text) in product_files() {
        let rel = path.strip_prefix(src()).unwrap().display().to_string();
        let full = std::fs::read_to_string(&path).unwrap().lines().count();
        if full > MAX_FILE_LINES {
            too_long.push(format!("{rel}: {full} lines"));
        }
        for (name, n) in functions(&text) {
            if n > MAX_FN_LINES {
                too_long.push(format!("{rel}: fn {name}: {n} lines"));
            }
        }
    }
    assert!(too_long.is_empty(), "over {MAX_FILE_LINES} lines a file or {MAX_FN_LINES} a function:\n{}", too_long.join("\n"));
    // The counter sees functions, and their length.
    let sample = "fn a() {\n    let s = \"}\";\n    if x { y(); }\n}\npub(crate) fn b(x: u8) -> u8 { x }\n";
    assert_eq!(functions(sample), vec![("a".to_owned(), 4), ("b".to_owned(), 1)]);
}
