//! The top-level modules of each library crate depend on one another without cycles.
//!
//! The graph is read from the sources: its nodes are the modules `lib.rs` declares (`mod x;`,
//! `pub mod x;`, with any attributes), a module's code being `src/x.rs` (or `src/x/mod.rs`) and
//! every file under `src/x/`. An edge `a -> b` is a `crate::b` path anywhere in the non-test code of
//! `a`: in a `use` line, inside a `use crate::{b::.., c}` group (nested braces included) or inline.
//! A name that `lib.rs` re-exports (`pub use error::{Error, Result}`) stands for the module it comes
//! from. Comments, string and character literals are blanked out first. Test code is left out:
//! files called `tests.rs`, items under `#[cfg(test)]` (matched to their closing brace, so a test
//! block in the middle of a file hides only itself), and the files of `#[cfg(test)] mod x;`.
//!
//! `cargo test --test module_graph -- --nocapture` prints each crate's graph.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

/// One source file: its path relative to `src/` (with `/` separators) and its text.
struct SourceFile {
    path: String,
    text: String,
}

/// The dependency graph of a crate's top-level modules.
struct ModuleGraph {
    /// For every module, the other modules its non-test code names.
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl ModuleGraph {
    /// Builds the graph of the crate whose `src/` files are `files` (one of them `lib.rs`).
    fn build(files: &[SourceFile]) -> Result<ModuleGraph, String> {
        let lib = files
            .iter()
            .find(|f| f.path == "lib.rs")
            .ok_or("no lib.rs among the sources")?;
        let lib_code = without_test_items(&blank_comments_and_literals(&lib.text));
        let modules = declared_modules(&lib_code);
        let reexports = root_reexports(&lib_code, &modules);

        // Files that only tests compile: `tests.rs`, and those of `#[cfg(test)] mod x;` anywhere.
        let mut test_paths: Vec<String> = Vec::new();
        for file in files {
            let code = blank_comments_and_literals(&file.text);
            let dir = child_module_dir(&file.path);
            for name in test_only_module_declarations(&code) {
                test_paths.push(format!("{dir}{name}.rs"));
                test_paths.push(format!("{dir}{name}/"));
            }
        }
        let is_test_file = |path: &str| {
            path == "tests.rs"
                || path.ends_with("/tests.rs")
                || test_paths
                    .iter()
                    .any(|t| path == t || (t.ends_with('/') && path.starts_with(t.as_str())))
        };

        let mut edges: BTreeMap<String, BTreeSet<String>> = modules
            .iter()
            .map(|m| (m.clone(), BTreeSet::new()))
            .collect();
        for file in files {
            if file.path == "lib.rs" || is_test_file(&file.path) {
                continue;
            }
            let first = file.path.split('/').next().unwrap_or_default();
            let module = first.strip_suffix(".rs").unwrap_or(first);
            let Some(targets) = edges.get_mut(module) else {
                continue;
            };
            let code = blank_comments_and_literals(&file.text);
            if is_test_only_file(&code) {
                continue;
            }
            for name in crate_path_heads(&without_test_items(&code)) {
                let target = if modules.contains(&name) {
                    Some(name)
                } else {
                    reexports.get(&name).cloned()
                };
                if let Some(target) = target.filter(|t| t != module) {
                    targets.insert(target);
                }
            }
        }
        Ok(ModuleGraph { edges })
    }

    /// Reads the `.rs` files under `src` and builds their graph.
    fn of_crate(src: &Path) -> Result<ModuleGraph, String> {
        let mut files = Vec::new();
        read_sources(src, src, &mut files)?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        ModuleGraph::build(&files)
    }

    /// A topological order (each module before the modules it uses), or `None` if there is a cycle.
    fn dependents_first(&self) -> Option<Vec<String>> {
        let (order, _) = self.kahn();
        (order.len() == self.edges.len()).then_some(order)
    }

    /// Kahn's algorithm: the modules it can order, and those left over (on or behind a cycle).
    fn kahn(&self) -> (Vec<String>, BTreeSet<String>) {
        let mut indegree: BTreeMap<&str, usize> =
            self.edges.keys().map(|m| (m.as_str(), 0)).collect();
        for targets in self.edges.values() {
            for t in targets {
                *indegree.entry(t.as_str()).or_default() += 1;
            }
        }
        let mut ready: Vec<&str> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(m, _)| *m)
            .collect();
        let mut order = Vec::new();
        while !ready.is_empty() {
            let m = ready.remove(0);
            order.push(m.to_string());
            for t in &self.edges[m] {
                let d = indegree.entry(t.as_str()).or_default();
                *d -= 1;
                if *d == 0 {
                    ready.push(t.as_str());
                }
            }
        }
        let left = self
            .edges
            .keys()
            .filter(|m| !order.contains(m))
            .cloned()
            .collect();
        (order, left)
    }

    /// Every elementary cycle once, each starting at its smallest module name, in sorted order.
    fn cycles(&self) -> Vec<Vec<String>> {
        let (_, left) = self.kahn();
        let mut cycles = BTreeSet::new();
        for start in &left {
            let mut trail = vec![start.clone()];
            self.walk_cycles(start, &left, &mut trail, &mut cycles);
        }
        cycles.into_iter().collect()
    }

    fn walk_cycles(
        &self,
        start: &str,
        left: &BTreeSet<String>,
        trail: &mut Vec<String>,
        cycles: &mut BTreeSet<Vec<String>>,
    ) {
        let node = trail.last().cloned().unwrap_or_default();
        for next in &self.edges[&node] {
            if next == start {
                cycles.insert(trail.clone());
            } else if left.contains(next) && next.as_str() > start && !trail.contains(next) {
                trail.push(next.clone());
                self.walk_cycles(start, left, trail, cycles);
                trail.pop();
            }
        }
    }

    fn targets(&self, module: &str) -> Vec<&str> {
        self.edges
            .get(module)
            .map(|t| t.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

impl fmt::Display for ModuleGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (module, targets) in &self.edges {
            let list: Vec<&str> = targets.iter().map(String::as_str).collect();
            let list = if list.is_empty() {
                "(nothing)".to_string()
            } else {
                list.join(", ")
            };
            writeln!(f, "  {module} -> {list}")?;
        }
        match self.dependents_first() {
            Some(order) => write!(
                f,
                "acyclic; dependents before dependencies:\n  {}",
                order.join(" -> ")
            ),
            None => {
                write!(f, "NOT acyclic; cycles:")?;
                for cycle in self.cycles() {
                    write!(f, "\n  {} -> {}", cycle.join(" -> "), cycle[0])?;
                }
                Ok(())
            }
        }
    }
}

fn read_sources(src: &Path, dir: &Path, files: &mut Vec<SourceFile>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        if path.is_dir() {
            read_sources(src, &path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let relative = path
                .strip_prefix(src)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            files.push(SourceFile {
                path: parts.join("/"),
                text,
            });
        }
    }
    Ok(())
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Replaces comments and the contents of string and character literals with spaces (newlines are
/// kept), so that no `crate::`, brace or attribute inside them is read as code.
fn blank_comments_and_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        // A raw string only where a token starts, not at the `r` that ends an identifier.
        let raw = if i > 0 && is_ident_char(chars[i - 1]) {
            None
        } else {
            raw_string_start(&chars, i)
        };
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if let Some((hashes, open)) = raw {
            i = open + 1;
            out.push('"');
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    out.push('"');
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
                if i < chars.len() {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && next == Some('\\') {
            // An escaped character literal: `'\n'`, `'\''`, `'\u{7f}'`.
            out.push('\'');
            i += 3;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            out.push('\'');
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            out.push_str("' '");
            i += 3;
        } else {
            // Code, and lifetimes (`'a`), which are not literals.
            out.push(c);
            i += 1;
        }
    }
    out
}

/// At `r"`, `r#"`, `br"`, ...: the number of `#` and the index of the opening quote.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let r = match chars[i] {
        'r' => i,
        'b' | 'c' if chars.get(i + 1) == Some(&'r') => i + 1,
        _ => return None,
    };
    let mut j = r + 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    (chars.get(j) == Some(&'"')).then_some((j - r - 1, j))
}

/// The index just past the bracket group that opens at `open` (`(`, `[` or `{`).
fn past_group(chars: &[char], open: usize) -> usize {
    let mut depth = 0usize;
    let mut i = open;
    while i < chars.len() {
        match chars[i] {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    chars.len()
}

fn skip_whitespace(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// Whether a `cfg` predicate (`test`, `all(test, unix)`, `any(test, test)`) holds only under test.
fn predicate_is_test_only(predicate: &str) -> bool {
    let p: String = predicate.chars().filter(|c| !c.is_whitespace()).collect();
    if p == "test" {
        return true;
    }
    let args = |inner: &str| -> Vec<String> {
        let mut parts = Vec::new();
        let (mut depth, mut part) = (0, String::new());
        for c in inner.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(std::mem::take(&mut part));
                    continue;
                }
                _ => {}
            }
            part.push(c);
        }
        parts.push(part);
        parts.into_iter().filter(|s| !s.is_empty()).collect()
    };
    if let Some(inner) = p.strip_prefix("all(").and_then(|s| s.strip_suffix(')')) {
        return args(inner).iter().any(|a| predicate_is_test_only(a));
    }
    if let Some(inner) = p.strip_prefix("any(").and_then(|s| s.strip_suffix(')')) {
        let args = args(inner);
        return !args.is_empty() && args.iter().all(|a| predicate_is_test_only(a));
    }
    false
}

/// If an outer attribute `#[...]` starts at `i`: its inside (without whitespace) and the index past it.
fn attribute_at(chars: &[char], i: usize) -> Option<(String, usize)> {
    if chars[i] != '#' {
        return None;
    }
    let open = skip_whitespace(chars, i + 1);
    if chars.get(open) != Some(&'[') {
        return None;
    }
    let end = past_group(chars, open);
    let inside: String = chars[open + 1..end.saturating_sub(1)]
        .iter()
        .filter(|c| !c.is_whitespace())
        .collect();
    Some((inside, end))
}

fn is_test_only_attribute(inside: &str) -> bool {
    inside
        .strip_prefix("cfg(")
        .and_then(|s| s.strip_suffix(')'))
        .is_some_and(predicate_is_test_only)
}

/// Whether the file starts with `#![cfg(test)]` (in already blanked code).
fn is_test_only_file(code: &str) -> bool {
    let compact: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    compact
        .strip_prefix("#![cfg(")
        .and_then(|s| s.find(")]").map(|end| &s[..end]))
        .is_some_and(predicate_is_test_only)
}

/// The items under a test-only `cfg` attribute in `code` (blanked), as `(start, end, text)`: from
/// the attribute to the item's `;` or closing brace.
fn test_items(code: &str) -> Vec<(usize, usize, String)> {
    let chars: Vec<char> = code.chars().collect();
    let mut items = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let Some((inside, end)) = attribute_at(&chars, i) else {
            i += 1;
            continue;
        };
        if !is_test_only_attribute(&inside) {
            i = end;
            continue;
        }
        let start = i;
        let mut j = skip_whitespace(&chars, end);
        // Further attributes of the same item.
        while let Some((_, next)) = attribute_at(&chars, j) {
            j = skip_whitespace(&chars, next);
        }
        let item_start = j;
        while j < chars.len() {
            match chars[j] {
                ';' => {
                    j += 1;
                    break;
                }
                '{' => {
                    j = past_group(&chars, j);
                    break;
                }
                '(' | '[' => j = past_group(&chars, j),
                _ => j += 1,
            }
        }
        items.push((start, j, chars[item_start..j].iter().collect()));
        i = j;
    }
    items
}

/// `code` (blanked) without its test-only items.
fn without_test_items(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    let mut out = String::new();
    let mut from = 0;
    for (start, end, _) in test_items(code) {
        out.extend(&chars[from..start]);
        out.extend(
            chars[start..end]
                .iter()
                .map(|&c| if c == '\n' { '\n' } else { ' ' }),
        );
        from = end;
    }
    out.extend(&chars[from..]);
    out
}

/// `mod x;` (with an optional visibility) as the whole of `item`: `Some("x")`.
fn module_declaration(item: &str) -> Option<String> {
    let mut rest = item.trim();
    if let Some(after) = rest.strip_prefix("pub") {
        let after = after.trim_start();
        rest = match after.strip_prefix('(') {
            Some(inner) => inner.split_once(')')?.1.trim_start(),
            None => after,
        };
    }
    let name = rest.strip_prefix("mod")?.strip_suffix(';')?;
    let name = name.trim();
    let starts_with_space = rest[3..].starts_with(char::is_whitespace);
    (starts_with_space && !name.is_empty() && name.chars().all(is_ident_char))
        .then(|| name.to_string())
}

/// The names of the `#[cfg(test)] mod x;` declarations in `code` (blanked).
fn test_only_module_declarations(code: &str) -> Vec<String> {
    test_items(code)
        .into_iter()
        .filter_map(|(_, _, item)| module_declaration(&item))
        .collect()
}

/// The folder (relative to `src/`, ending in `/` unless empty) holding the files of the modules a
/// file declares: `lib.rs` → ``, `x.rs` and `x/mod.rs` → `x/`, `x/y.rs` → `x/y/`.
fn child_module_dir(path: &str) -> String {
    if path == "lib.rs" {
        return String::new();
    }
    if let Some(dir) = path.strip_suffix("mod.rs") {
        return dir.to_string();
    }
    format!("{}/", path.strip_suffix(".rs").unwrap_or(path))
}

/// The modules declared at the top level of `lib` (blanked, test items removed).
fn declared_modules(lib: &str) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    for statement in top_level_statements(lib) {
        if let Some(name) = module_declaration(&statement) {
            modules.insert(name);
        }
    }
    modules
}

/// The top-level statements of `code` ending in `;` (attributes removed); items with a body at the
/// top level are skipped whole.
fn top_level_statements(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut i = 0;
    while i < chars.len() {
        if let Some((_, end)) = attribute_at(&chars, i) {
            i = end;
            continue;
        }
        if chars[i] == '#' && chars.get(i + 1) == Some(&'!') {
            // An inner attribute of the crate: `#![warn(missing_docs)]`.
            let open = skip_whitespace(&chars, i + 2);
            i = past_group(&chars, open);
            continue;
        }
        match chars[i] {
            ';' => {
                current.push(';');
                statements.push(std::mem::take(&mut current));
                i += 1;
            }
            '{' if !current
                .replace(')', ") ")
                .split_whitespace()
                .any(|w| w == "use") =>
            {
                // A body (`mod x { .. }`, `fn f() { .. }`): not a declaration.
                i = past_group(&chars, i);
                current.clear();
            }
            '(' | '[' | '{' => {
                let end = past_group(&chars, i);
                current.extend(&chars[i..end]);
                i = end;
            }
            c => {
                current.push(c);
                i += 1;
            }
        }
    }
    statements
}

/// The names that `pub use` statements of `lib` (blanked, test items removed) put at the crate
/// root, each with the module it comes from.
fn root_reexports(lib: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut reexports = BTreeMap::new();
    for statement in top_level_statements(lib) {
        let s = statement.trim();
        let Some(rest) = s.strip_prefix("pub") else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('(') {
            Some(inner) => inner.split_once(')').map_or("", |(_, r)| r.trim_start()),
            None => rest,
        };
        let Some(tree) = rest.strip_prefix("use").and_then(|t| t.strip_suffix(';')) else {
            continue;
        };
        let tree: String = tree
            .chars()
            .filter(|c| !c.is_whitespace() || *c == ' ')
            .collect();
        let tree = tree.trim();
        let tree = tree
            .strip_prefix("self::")
            .or_else(|| tree.strip_prefix("crate::"))
            .unwrap_or(tree);
        let Some((module, _)) = tree.split_once("::") else {
            continue;
        };
        if !modules.contains(module.trim()) {
            continue;
        }
        for name in use_tree_names(tree) {
            reexports.insert(name, module.trim().to_string());
        }
    }
    reexports
}

/// The names a use tree brings into scope: `a::{B, c::D as E, f::{self}}` → `B`, `E`, `f`.
fn use_tree_names(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let prefix = tree[..open].trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        return split_top_level(inner)
            .into_iter()
            .flat_map(|part| {
                if part.trim() == "self" {
                    prefix
                        .rsplit("::")
                        .next()
                        .map(|s| s.trim().to_string())
                        .into_iter()
                        .collect()
                } else {
                    use_tree_names(&part)
                }
            })
            .collect();
    }
    let name = match tree.split_once(" as ") {
        Some((_, alias)) => alias.trim(),
        None => tree.rsplit("::").next().unwrap_or(tree).trim(),
    };
    if name.is_empty() || name == "*" || name == "_" {
        Vec::new()
    } else {
        vec![name.to_string()]
    }
}

/// `inner` split at the commas that are not inside braces.
fn split_top_level(inner: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut part) = (0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut part));
                continue;
            }
            _ => {}
        }
        part.push(c);
    }
    parts.push(part);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// The first segment after every `crate::` in `code` (blanked, test items removed); for a
/// `crate::{a::X, b}` group, the first segment of each of its parts.
fn crate_path_heads(code: &str) -> BTreeSet<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut heads = BTreeSet::new();
    let ident_at = |i: usize| -> String {
        chars[i..]
            .iter()
            .take_while(|c| is_ident_char(**c))
            .collect()
    };
    let mut i = 0;
    while let Some(offset) = code_find(&chars[i..], "crate") {
        let at = i + offset;
        i = at + 5;
        if at > 0 && is_ident_char(chars[at - 1]) {
            continue;
        }
        let mut j = skip_whitespace(&chars, i);
        if chars.get(j) != Some(&':') || chars.get(j + 1) != Some(&':') {
            continue;
        }
        j = skip_whitespace(&chars, j + 2);
        if chars.get(j) == Some(&'{') {
            let end = past_group(&chars, j);
            let inner: String = chars[j + 1..end.saturating_sub(1)].iter().collect();
            for part in split_top_level(&inner) {
                let part: Vec<char> = part.trim().chars().collect();
                let head: String = part.iter().take_while(|c| is_ident_char(**c)).collect();
                if !head.is_empty() && head != "self" {
                    heads.insert(head);
                }
            }
        } else {
            let head = ident_at(j);
            if !head.is_empty() {
                heads.insert(head);
            }
        }
    }
    heads
}

fn code_find(chars: &[char], needle: &str) -> Option<usize> {
    let needle: Vec<char> = needle.chars().collect();
    chars
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
}

/// Builds, prints and checks the graph of the crate at `src` (relative to the repository root).
fn assert_acyclic(src: &str) -> ModuleGraph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
    let graph = ModuleGraph::of_crate(&path).unwrap_or_else(|e| panic!("{src}: {e}"));
    println!("{src}:\n{graph}\n");
    assert!(
        graph.edges.len() > 1,
        "{src}: fewer than two modules read:\n{graph}"
    );
    let cycles = graph.cycles();
    assert!(
        cycles.is_empty(),
        "{src}: the module graph has cycles:\n{}\n\nfull graph:\n{graph}",
        cycles
            .iter()
            .map(|c| format!("  {} -> {}", c.join(" -> "), c[0]))
            .collect::<Vec<_>>()
            .join("\n")
    );
    graph
}

#[test]
fn runtime_modules_are_acyclic() {
    let graph = assert_acyclic("crates/runtime/src");
    let edges: usize = graph.edges.values().map(BTreeSet::len).sum();
    assert!(edges > 10, "only {edges} edges read:\n{graph}");
    // `chat` names `error` only as `crate::{Error, Result}`, through lib.rs's re-export.
    assert!(graph.targets("chat").contains(&"error"), "{graph}");
}

#[test]
fn kernels_modules_are_acyclic() {
    let graph = assert_acyclic("kernels/src");
    let edges: usize = graph.edges.values().map(BTreeSet::len).sum();
    assert!(edges > 10, "only {edges} edges read:\n{graph}");
    // `rng` and `measure` are declared under `cfg` attributes.
    assert!(
        graph.edges.contains_key("rng") && graph.edges.contains_key("measure"),
        "{graph}"
    );
}

#[test]
fn tooling_modules_are_acyclic() {
    let graph = assert_acyclic("crates/tooling/src");
    assert_eq!(
        graph.edges.keys().collect::<Vec<_>>(),
        ["bench", "synthetic"]
    );
}

#[test]
fn capi_modules_are_acyclic() {
    let graph = assert_acyclic("crates/capi/src");
    // The exported calls share the argument readers and the error guard, which depend on neither.
    for module in ["session", "generate", "tokenize"] {
        assert!(graph.targets(module).contains(&"ffi"), "{module}:\n{graph}");
        assert!(
            graph.targets(module).contains(&"error"),
            "{module}:\n{graph}"
        );
    }
}

fn synthetic(files: &[(&str, &str)]) -> ModuleGraph {
    let files: Vec<SourceFile> = files
        .iter()
        .map(|(path, text)| SourceFile {
            path: path.to_string(),
            text: text.to_string(),
        })
        .collect();
    let graph = ModuleGraph::build(&files).unwrap_or_else(|e| panic!("{e}"));
    println!("synthetic:\n{graph}\n");
    graph
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn two_and_three_cycles_are_both_reported() {
    let graph = synthetic(&[
        (
            "lib.rs",
            "//! A crate.\n#![warn(missing_docs)]\npub mod a;\nmod b;\n#[cfg(feature = \"x\")]\npub mod c;\n\
             pub mod d;\npub(crate) mod e;\nmod error;\nmod leaf;\n\
             pub use error::{Error, Result};\npub use c::{Thing, other::Widget as Gadget};\n",
        ),
        ("a.rs", "use crate::b::B;\npub struct A;\n"),
        ("b.rs", "pub struct B(crate::a::A);\nfn f() -> crate::Result<()> { Ok(()) }\n"),
        ("c.rs", "pub struct Thing;\npub fn g() { crate::d::h() }\n"),
        ("c/other.rs", "pub struct Widget;\n"),
        ("d.rs", "use crate::{\n    e::{X, Y},\n    leaf,\n};\npub fn h() {}\n"),
        ("e.rs", "pub struct X(crate::Gadget);\npub struct Y;\n"),
        ("error.rs", "pub struct Error;\npub type Result<T> = std::result::Result<T, Error>;\n"),
        ("leaf.rs", "pub fn l() {}\n"),
    ]);
    assert_eq!(graph.targets("b"), ["a", "error"]);
    assert_eq!(graph.targets("d"), ["e", "leaf"]);
    assert_eq!(graph.targets("e"), ["c"]);
    assert_eq!(graph.dependents_first(), None);
    assert_eq!(
        graph.cycles(),
        [names(&["a", "b"]), names(&["c", "d", "e"])]
    );
    assert!(graph.to_string().contains("c -> d -> e -> c"), "{graph}");
}

#[test]
fn nested_use_groups_give_one_edge_per_module() {
    let graph = synthetic(&[
        ("lib.rs", "mod a;\nmod b;\nmod c;\nmod m;\n"),
        ("a.rs", "pub struct X; pub struct Y;\n"),
        ("b.rs", "pub struct Z;\n"),
        ("c.rs", "pub struct W;\n"),
        ("m.rs", "use crate::{a::{X, Y}, b};\n"),
        ("m/inner.rs", "pub fn f() -> crate::c::W { crate::c::W }\n"),
    ]);
    assert_eq!(graph.targets("m"), ["a", "b", "c"]);
    assert_eq!(graph.cycles(), Vec::<Vec<String>>::new());
    assert_eq!(graph.dependents_first(), Some(names(&["m", "a", "b", "c"])));
}

#[test]
fn test_code_comments_and_literals_are_not_edges() {
    let graph = synthetic(&[
        ("lib.rs", "mod a;\nmod b;\nmod c;\nmod d;\nmod e;\nmod f;\nmod g;\nmod h;\nmod i;\nmod m;\n#[cfg(test)]\nmod tests;\n"),
        (
            "m.rs",
            "// use crate::b;\n/* crate::c /* nested */ crate::c */\n\
             const S: &str = \"crate::d {\";\nconst R: &str = r#\"crate::d \" {\"#;\nconst Q: char = '{';\n\
             fn l<'a>(x: &'a str) -> &'a str { x }\n\
             #[cfg(test)]\nmod tests {\n    use crate::e;\n    fn t() { let _ = '}'; }\n}\n\
             #[cfg(test)]\nfn helper() { crate::g::x() }\n\
             #[cfg(all(test, unix))]\nuse crate::g::Y;\n\
             #[cfg(test)]\nmod extra;\n\
             #[cfg(any(test, feature = \"fixtures\"))]\npub fn fixture() -> crate::i::I { todo!() }\n\
             use crate::f::F;\n",
        ),
        ("m/tests.rs", "use crate::h;\n"),
        ("m/extra.rs", "use crate::h;\n"),
        ("m/extra/deeper.rs", "use crate::h;\n"),
        ("tests.rs", "use crate::h;\n"),
    ]);
    // `f` is after the test blocks, so they were closed at their braces; `i` is also compiled
    // outside tests.
    assert_eq!(graph.targets("m"), ["f", "i"]);
    assert!(!graph.edges.contains_key("tests"), "{graph}");
}
