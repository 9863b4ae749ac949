//! Every link in the README, CONTRIBUTING.md and BENCHMARKS.md resolves: a file of the repository exists, an
//! anchor names a heading of its page, and a docs.rs link into this crate's own docs points at
//! a page that exists here, at a heading it has (intra-doc links are `cargo doc -D warnings`'s
//! job).

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DOCS_RS: &str = "https://docs.rs/tower-cancel/latest/tower_cancel/";

/// The targets of the markdown links `[text](target)` in `text`.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            found.push(rest[..end].to_owned());
        }
    }
    found
}

/// rustdoc's (and GitHub's) id for a heading: lowercase, spaces as `-`, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The ids of the headings in a markdown text, or in the `//!` docs of a source file.
fn anchors(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let markdown = path.extension().is_some_and(|e| e == "md");
    let mut in_code = false;
    let mut ids = Vec::new();
    for line in text.lines() {
        let line = if markdown {
            line
        } else {
            match line.strip_prefix("//!") {
                Some(doc) => doc.strip_prefix(' ').unwrap_or(doc),
                None => continue,
            }
        };
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if hashes > 0 && line[hashes..].starts_with(' ') {
            ids.push(slug(&line[hashes..]));
        }
    }
    ids
}

/// The source of a docs.rs page of this crate: a guide page's markdown, or a module's file.
/// `None` for an item's page (`struct.X.html`), whose anchors are rustdoc's own.
fn source_of(page: &str) -> Option<PathBuf> {
    let root = Path::new(ROOT);
    if page == "index.html" {
        return Some(root.join("src/lib.rs"));
    }
    if page == "guide/index.html" {
        return Some(root.join("docs/guide.md"));
    }
    if let Some(name) = page
        .strip_prefix("guide/")
        .and_then(|p| p.strip_suffix("/index.html"))
    {
        return Some(root.join(format!("docs/{name}.md")));
    }
    if let Some(module) = page.strip_suffix("/index.html") {
        let folder = root.join(format!("src/{module}/mod.rs"));
        return Some(if folder.exists() {
            folder
        } else {
            root.join(format!("src/{module}.rs"))
        });
    }
    None
}

fn check(file: &str) -> Vec<String> {
    let path = Path::new(ROOT).join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut broken = Vec::new();
    for link in links(&text) {
        let (target, anchor) = match link.split_once('#') {
            Some((target, anchor)) => (target, Some(anchor)),
            None => (link.as_str(), None),
        };
        if let Some(page) = target.strip_prefix(DOCS_RS) {
            let Some(source) = source_of(page) else {
                continue;
            };
            if !source.exists() {
                broken.push(format!("{file}: {link}: no {}", source.display()));
            } else if let Some(anchor) = anchor {
                if !anchors(&source).iter().any(|id| id == anchor) {
                    broken.push(format!(
                        "{file}: {link}: no heading #{anchor} in {}",
                        source.display()
                    ));
                }
            }
            continue;
        }
        if target.starts_with("http://") || target.starts_with("https://") {
            continue;
        }
        let source = if target.is_empty() {
            path.clone()
        } else {
            Path::new(ROOT).join(target)
        };
        if !source.exists() {
            broken.push(format!("{file}: {link}: no such file"));
        } else if let Some(anchor) = anchor {
            if !anchors(&source).iter().any(|id| id == anchor) {
                broken.push(format!("{file}: {link}: no heading #{anchor}"));
            }
        }
    }
    broken
}

#[test]
fn every_link_of_the_readme_contributing_and_benchmarks_resolves() {
    let mut broken = check("README.md");
    broken.extend(check("CONTRIBUTING.md"));
    broken.extend(check("BENCHMARKS.md"));
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_slugs_are_rustdocs() {
    assert_eq!(
        slug(" Two phases: a drain, then the cancel"),
        "two-phases-a-drain-then-the-cancel"
    );
    assert_eq!(
        slug("A client that leaves an unread upload: `PeerWatch`"),
        "a-client-that-leaves-an-unread-upload-peerwatch"
    );
}
