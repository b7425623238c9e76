//! The policies the documentation shows are valid against the schema.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking"
)]

use postern_policy::{Policies, Source};

/// The ```cedar blocks of a Markdown file.
fn cedar_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```cedar") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn every_policy_in_the_docs_validates() {
    for (doc, at_least) in [("policy.md", 7), ("identity-providers.md", 4)] {
        let path = format!("{}/../docs/{doc}", env!("CARGO_MANIFEST_DIR"));
        let blocks = cedar_blocks(&std::fs::read_to_string(path).unwrap());
        assert!(blocks.len() >= at_least, "docs/{doc} shows its examples");
        for (index, text) in blocks.iter().enumerate() {
            let source = Source {
                name: format!("docs/{doc} block {}", index + 1),
                text: text.clone(),
            };
            if let Err(err) = Policies::from_sources(&[source]) {
                panic!("docs/{doc} block {}:\n{text}\n{err}", index + 1);
            }
        }
    }
}
