//! The docs name only what exists, the crate doc names everything, and the
//! modules import one another without a loop.
//!
//! - docs/architecture.md: every source file (`src/...rs`, or a path like
//!   `proxy/h1.rs` relative to src/), every source folder it names in code
//!   (`proxy/`) and every module path it names (`hub::LANE_QUEUE_MAX`) exists.
//! - src/lib.rs: the crate doc's Layout section has one item for every
//!   module file under src/, and no item for a module that is gone.
//! - Every relative link in the docs (docs/**/*.md and README.md) points to
//!   a file that exists, and a `#fragment` to a heading of that page.
//! - src/: the graph of which top-level module imports which (read from the
//!   `crate::` paths of the code, tests aside) has no cycle, and `config`
//!   imports only modules that import nothing.
//!
//! Plain file reads: no server, nothing timed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// Markdown text outside fenced code blocks, line by line.
fn prose_lines(markdown: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            lines.push(line);
        }
    }
    lines
}

/// The contents of the inline code spans of `line`.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// Paths written as `src/...` (or `tests/...`, `benches/...`, `bench/...`) are
/// from the repository's root; any other path ending in `.rs` is from src/.
fn source_path(written: &str) -> PathBuf {
    let from_root = ["src/", "tests/", "benches/", "bench/"]
        .iter()
        .any(|dir| written.starts_with(dir));
    if from_root {
        root().join(written)
    } else {
        root().join("src").join(written)
    }
}

/// Whether a `::` path names a module of the library: every segment but the
/// last a folder under src/, the last `name.rs` or `name/mod.rs` in it.
fn module_exists(path: &[&str]) -> bool {
    let mut dir = root().join("src");
    for (index, segment) in path.iter().enumerate() {
        let file = dir.join(format!("{segment}.rs"));
        let folder = dir.join(segment);
        let last = index + 1 == path.len();
        if last {
            return file.is_file() || folder.join("mod.rs").is_file();
        }
        if !folder.is_dir() {
            return false;
        }
        dir = folder;
    }
    false
}

#[test]
fn architecture_names_only_sources_that_exist() {
    let doc = read(&root().join("docs/architecture.md"));
    let mut files = BTreeSet::new();
    let mut folders = BTreeSet::new();
    let mut modules = BTreeSet::new();
    for line in prose_lines(&doc) {
        let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
        for word in line.split(|c: char| !is_path_char(c)) {
            let word = word.trim_end_matches('.');
            if word.ends_with(".rs") {
                files.insert(word.to_owned());
            }
        }
        for span in code_spans(line) {
            let is_folder = span.ends_with('/')
                && span.len() > 1
                && span[..span.len() - 1].split('/').all(|part| {
                    !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                });
            if is_folder {
                folders.insert(span.to_owned());
            }
            // `module::item` or `module::sub::item`: every lowercase segment
            // before the last one names a module.
            if let Some((head, _)) = span.rsplit_once("::") {
                let segments: Vec<&str> = head.split("::").collect();
                let lowercase = |s: &&str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                };
                if segments.iter().all(lowercase) {
                    modules.insert(head.to_owned());
                }
            }
        }
    }
    // The scan must find what the page is about, or it checks nothing.
    assert!(
        files.len() >= 20,
        "only {} source files found: {files:?}",
        files.len()
    );
    assert!(!folders.is_empty(), "no source folders found");
    assert!(!modules.is_empty(), "no module paths found");

    let mut missing = Vec::new();
    for file in &files {
        if !source_path(file).is_file() {
            missing.push(format!("file {file}"));
        }
    }
    for folder in &folders {
        if !source_path(folder.trim_end_matches('/')).is_dir() {
            missing.push(format!("folder {folder}"));
        }
    }
    for module in &modules {
        let segments: Vec<&str> = module.split("::").collect();
        if !module_exists(&segments) {
            missing.push(format!("module {module}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/architecture.md names sources that do not exist: {missing:?}"
    );
}

/// Every module file under `dir` (relative to src/), as a module path:
/// `config`, `proxy`, `proxy::h1`.
fn module_files(dir: &Path, prefix: &[String], out: &mut BTreeSet<String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("listing {}: {err}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 file names")
            .to_owned();
        if path.is_dir() {
            // A folder holds submodules (`proxy/mod.rs`, or `server.rs` beside
            // `server/`); only its `.rs` files are modules (src/demo/ holds
            // the demo page's assets).
            let mut inner = prefix.to_vec();
            inner.push(name);
            module_files(&path, &inner, out);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            let mut module = prefix.to_vec();
            if stem != "mod" {
                module.push(stem.to_owned());
            }
            out.insert(module.join("::"));
        }
    }
}

/// The module each item of the crate doc's Layout section names, as a
/// module path: an item starts with its module in code, as a link
/// (`` [`config`] ``), a path (`` `proxy::h1` ``) or a file
/// (`` `proxy/h1.rs` ``).
fn layout_items(lib: &str) -> Vec<String> {
    let doc: Vec<&str> = lib
        .lines()
        .map_while(|line| line.strip_prefix("//!"))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect();
    let start = doc
        .iter()
        .position(|line| *line == "# Layout")
        .expect("src/lib.rs's crate doc has a `# Layout` section");
    let mut items = Vec::new();
    for line in &doc[start + 1..] {
        if line.starts_with("# ") {
            break;
        }
        let Some(item) = line.trim_start().strip_prefix("- ") else {
            continue;
        };
        let name = item
            .strip_prefix('[')
            .unwrap_or(item)
            .strip_prefix('`')
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name)
            .unwrap_or_else(|| panic!("a Layout item must start with its module in code: {line}"));
        let module = match name.strip_suffix(".rs") {
            Some(path) => path.trim_end_matches("/mod").replace('/', "::"),
            None => name.to_owned(),
        };
        items.push(module);
    }
    items
}

#[test]
fn lib_layout_lists_every_module() {
    let lib = read(&root().join("src/lib.rs"));
    let listed = layout_items(&lib);
    let mut modules = BTreeSet::new();
    module_files(&root().join("src"), &[], &mut modules);
    // The crate root and the binary are not modules of the library.
    modules.remove("lib");
    modules.remove("main");
    assert!(
        modules.len() >= 30,
        "only {} modules found under src/",
        modules.len()
    );

    let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
    let unlisted: Vec<_> = modules.difference(&listed_set).collect();
    let gone: Vec<_> = listed_set.difference(&modules).collect();
    assert!(
        unlisted.is_empty(),
        "src/lib.rs's Layout does not list these modules: {unlisted:?}"
    );
    assert!(
        gone.is_empty(),
        "src/lib.rs's Layout lists modules that do not exist: {gone:?}"
    );
    assert_eq!(
        listed.len(),
        listed_set.len(),
        "a module is listed twice: {listed:?}"
    );
}

#[test]
fn layout_items_are_read_in_every_form() {
    let lib = "//! Crate.\n//!\n//! # Layout\n//!\n//! - [`config`]: settings.\n\
               //!   - `proxy::h1`: the lean client.\n//!   - `proxy/pool.rs`: the pool.\n\
               //! - [`proxy`]: the proxy, with `a::b` inside.\n//!\n//! # Running\n//!\n\
               //! - [`ignored`]: after the section.\n#![forbid(unsafe_code)]\n";
    assert_eq!(
        layout_items(lib),
        ["config", "proxy::h1", "proxy::pool", "proxy"]
    );
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces
/// to hyphens; a repeated heading gets `-1`, `-2`...
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose_lines(markdown) {
        let Some(text) = line
            .strip_prefix('#')
            .map(|rest| rest.trim_start_matches('#'))
            .filter(|rest| rest.starts_with(' '))
        else {
            continue;
        };
        let slug: String = text
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 0;
        while seen.contains(&unique) {
            n += 1;
            unique = format!("{slug}-{n}");
        }
        seen.insert(unique);
    }
    seen
}

/// The targets of the inline links `[text](target)` of `markdown`, outside
/// code blocks and code spans.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose_lines(markdown) {
        // Code spans hold examples, not links.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            // A title after the target: `(page.md "Title")`.
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            targets.push(target.to_owned());
            rest = &rest[end..];
        }
    }
    targets
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|err| panic!("listing {}: {err}", dir.display()))
    {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            markdown_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "md") {
            out.push(path);
        }
    }
}

#[test]
fn doc_links_point_to_what_exists() {
    let mut pages = vec![root().join("README.md")];
    markdown_files(&root().join("docs"), &mut pages);
    pages.sort();
    let mut checked = 0;
    let mut broken = Vec::new();
    for page in &pages {
        let text = read(page);
        let here = page.parent().expect("a page is in a folder");
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
                continue;
            }
            checked += 1;
            let (path, fragment) = match target.split_once('#') {
                Some((path, fragment)) => (path, Some(fragment)),
                None => (target.as_str(), None),
            };
            let linked = if path.is_empty() {
                page.clone()
            } else {
                here.join(path)
            };
            let shown = page
                .strip_prefix(root())
                .unwrap_or(page)
                .display()
                .to_string();
            if !linked.exists() {
                broken.push(format!("{shown}: {target} (no such file)"));
                continue;
            }
            let Some(fragment) = fragment else { continue };
            if linked.extension().is_some_and(|ext| ext == "md")
                && !anchors(&read(&linked)).contains(fragment)
            {
                broken.push(format!("{shown}: {target} (no such heading)"));
            }
        }
    }
    assert!(
        checked >= 50,
        "only {checked} links found in {} pages",
        pages.len()
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_follow_github() {
    let page = "# Title\n\n## POST /api/publish\n\n```sh\n# not a heading\n```\n\n\
                ## One `id:` line (scenario a)\n\n## Title\n";
    let found = anchors(page);
    let expected: BTreeSet<String> = [
        "title",
        "post-apipublish",
        "one-id-line-scenario-a",
        "title-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(found, expected);
}

/// The top-level modules each top-level module's code names through
/// `crate::` (in `use` lines and inline paths, groups included). Test code
/// is left out: a test may use any module. Line comments are dropped, so a
/// doc comment naming a module is no import.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("listing src/") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let src = root().join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files {
        let relative = path.strip_prefix(&src).expect("under src/");
        let first = relative.components().next().expect("a path");
        let top = first
            .as_os_str()
            .to_str()
            .expect("UTF-8")
            .trim_end_matches(".rs");
        let test_file = relative.file_name().is_some_and(|n| n == "tests.rs");
        if ["lib", "main"].contains(&top) || test_file {
            continue;
        }
        let text = read(&path);
        let code = text
            .split("#[cfg(test)]\nmod tests {")
            .next()
            .expect("split gives one part");
        let code: String = code
            .lines()
            .map(|line| line.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let imports = graph.entry(top.to_owned()).or_default();
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a::b, c::{d, e}}`: the first segment of each
                // top-level item of the group.
                let mut depth = 0;
                let mut item = String::new();
                for ch in group.chars() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            imports.insert(first_segment(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(ch);
                }
                imports.insert(first_segment(&item));
            } else {
                imports.insert(first_segment(rest));
            }
        }
        imports.remove("");
        imports.remove(top);
    }
    graph
}

fn first_segment(path: &str) -> String {
    path.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// A cycle of `graph`, if it has one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|n| n == node).expect("on the path");
                let mut cycle = path[from..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn modules_import_one_another_without_a_loop() {
    let graph = import_graph();
    assert!(graph.len() >= 20, "only {} modules read", graph.len());
    assert!(
        graph["node"].contains("config") && graph["transport"].contains("auth"),
        "the reader misses imports: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("src/ modules import in a loop: {}", cycle.join(" -> "));
    }
    // config is parsed first and used by everything: it may import only
    // modules that themselves import nothing.
    for module in &graph["config"] {
        assert!(
            graph.get(module).is_none_or(BTreeSet::is_empty),
            "config imports `{module}`, which imports {:?}",
            graph[module]
        );
    }
}

#[test]
fn the_loop_finder_finds_loops() {
    let graph = |edges: &[(&str, &str)]| {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            graph
                .entry((*from).into())
                .or_default()
                .insert((*to).into());
            graph.entry((*to).into()).or_default();
        }
        graph
    };
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])),
        None
    );
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(first_segment(" hub::Hub"), "hub");
    assert_eq!(first_segment("config::{A, B}"), "config");
}
