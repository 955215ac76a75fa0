#!/usr/bin/env python3
"""Extracts the module dependency graph of a crate from its `crate::` paths and checks that it
has no cycles.

Usage: tools/module_graph.py [crate/src]   (default: crates/runtime/src)

Nodes are the crate's top-level modules (`src/x.rs` and everything under `src/x/`). An edge
`a -> b` is any `crate::b` path (in `use` lines, `use crate::{b::..}` groups or inline paths) in
the non-test code of `a`; `crate::Error` / `crate::Result` (re-exported by lib.rs) count as
`error`. Test code is left out: files called `tests.rs` and `#[cfg(test)] mod tests { .. }`
blocks. Comments are ignored. Prints the edges, and either a topological order (exit 0) or the
cycles found (exit 1).
"""
import pathlib
import re
import sys

ROOT_REEXPORTS = {"Error": "error", "Result": "error"}


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def strip_tests(text):
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+tests\s*\{", text)
    return text[: m.start()] if m else text


def referenced(code, modules):
    found = set()
    # `use crate::{a::x, b}` groups: every first segment inside the braces.
    for group in re.finditer(r"crate::\{([^}]*(?:\{[^}]*\}[^}]*)*)\}", code, flags=re.S):
        depth, token = 0, ""
        for ch in group.group(1) + ",":
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                first = token.strip().split("::")[0].strip()
                if first:
                    found.add(first)
                token = ""
                continue
            if depth == 0:
                token += ch
    for path in re.finditer(r"crate::([A-Za-z_][A-Za-z0-9_]*)", code):
        found.add(path.group(1))
    out = set()
    for name in found:
        if name in modules:
            out.add(name)
        elif name in ROOT_REEXPORTS:
            out.add(ROOT_REEXPORTS[name])
    return out


def main():
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "crates/runtime/src")
    lib = strip_comments((src / "lib.rs").read_text())
    modules = sorted(set(re.findall(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+([a-z_0-9]+)\s*;", lib, flags=re.M)))
    edges = {m: set() for m in modules}
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src)
        if rel.name == "tests.rs" or rel == pathlib.Path("lib.rs"):
            continue
        module = rel.parts[0].removesuffix(".rs")
        if module not in edges:
            continue
        code = strip_tests(strip_comments(path.read_text()))
        edges[module] |= referenced(code, modules) - {module}
    for m in modules:
        print(f"{m} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
    # Kahn's algorithm: what is left over lies on or behind a cycle.
    indegree = {m: 0 for m in modules}
    for m in modules:
        for d in edges[m]:
            indegree[d] += 1
    order, ready = [], sorted(m for m in modules if indegree[m] == 0)
    while ready:
        m = ready.pop(0)
        order.append(m)
        for d in sorted(edges[m]):
            indegree[d] -= 1
            if indegree[d] == 0:
                ready.append(d)
    if len(order) == len(modules):
        print("acyclic; dependents before dependencies:")
        print("  " + " -> ".join(order))
        return 0
    left = set(modules) - set(order)
    print("NOT acyclic; on or behind a cycle:", ", ".join(sorted(left)))
    # Every elementary cycle, each once (starting from its smallest module).
    cycles = set()

    def walk(start, node, trail):
        for d in sorted(edges[node]):
            if d == start:
                cycles.add(tuple(trail))
            elif d in left and d > start and d not in trail:
                walk(start, d, trail + [d])

    for start in sorted(left):
        walk(start, start, [start])
    for cycle in sorted(cycles):
        print("  cycle: " + " -> ".join(cycle + (cycle[0],)))
    return 1


if __name__ == "__main__":
    sys.exit(main())
