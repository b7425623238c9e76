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
            if let Err(err) = Policies::from_sources(&[source], None) {
                panic!("docs/{doc} block {}:\n{text}\n{err}", index + 1);
            }
        }
    }
}

/// The example policy folders: every case in their `tests/` passes, through the same mapping
/// the broker uses.
#[test]
fn the_example_policy_sets_pass_their_tests() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let zone = jiff::tz::TimeZone::get("Europe/Madrid").unwrap();
    let mut sets = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        sets += 1;
        let policies =
            Policies::load_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut cases = 0;
        for file in std::fs::read_dir(dir.join("tests")).unwrap() {
            let file = file.unwrap().path();
            for case in postern_policy::parse_cases(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            {
                let outcome = case.run(&policies, &zone).unwrap();
                assert!(
                    outcome.failures.is_empty(),
                    "{}: {}: {:?}",
                    file.display(),
                    case.name,
                    outcome.failures
                );
                cases += 1;
            }
        }
        assert!(cases > 0, "{} has test cases", dir.display());
    }
    assert!(
        sets >= 1,
        "found the example sets in {}",
        examples.display()
    );
}

mod cli {
    use std::path::Path;
    use std::process::{Command, Output};

    fn run(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_postern-policy"))
            .args(args)
            .output()
            .unwrap()
    }

    fn text(output: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    fn folder(policy: &str, cases: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.cedar"), policy).unwrap();
        std::fs::create_dir(dir.path().join("tests")).unwrap();
        std::fs::write(dir.path().join("tests").join("cases.json"), cases).unwrap();
        dir
    }

    const POLICY: &str = "@id(\"staff-only\")\npermit (principal in Group::\"staff\", action == Action::\"connect\", resource);\n";

    fn case(groups: &str, decision: &str) -> String {
        format!(
            r#"[{{"name": "case", "principal": {{"id": "https://idp.example.org#alice", "groups": [{groups}]}}, "action": "connect", "resource": "imap", "decision": "{decision}"}}]"#
        )
    }

    #[test]
    fn test_exit_codes_say_pass_error_failure_and_invalid() {
        let pass = folder(POLICY, &case("\"staff\"", "allow"));
        let out = run(&["test", pass.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(
            text(&out).contains("PASS   cases.json: case"),
            "{}",
            text(&out)
        );
        assert!(text(&out).contains("1 passed, 0 failed"), "{}", text(&out));

        let fail = folder(POLICY, &case("", "allow"));
        let out = run(&["test", fail.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains("expected allow, got deny"),
            "{}",
            text(&out)
        );

        let error = folder(POLICY, "[{\"name\": \"x\"}]");
        let out = run(&["test", error.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));

        let invalid = folder(
            "permit (principal, action, resource) when { principal.nope };",
            &case("", "deny"),
        );
        let out = run(&["test", invalid.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    }

    #[test]
    fn validate_points_at_file_line_and_column() {
        let dir = folder(
            "// first line\npermit (principal, action, resource)\nwhen { context.nope };\n",
            "[]",
        );
        let out = run(&["validate", dir.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        let expected = format!("{}:3:", dir.path().join("p.cedar").display());
        assert!(text(&out).contains(&expected), "{}", text(&out));

        let good = folder(POLICY, "[]");
        std::fs::write(
            good.path().join("entities.json"),
            r#"[{"uid": {"type": "Group", "id": "staff"}}]"#,
        )
        .unwrap();
        let out = run(&["validate", good.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(
            text(&out).contains("1 policies, 1 users and groups"),
            "{}",
            text(&out)
        );

        std::fs::write(good.path().join("entities.json"), "[{\"uid\": ").unwrap();
        let out = run(&["validate", good.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        assert!(text(&out).contains("entities.json:1:"), "{}", text(&out));
    }

    #[test]
    fn explain_names_the_deciding_policies_and_takes_overrides() {
        let dir = folder(
            &format!(
                "{POLICY}@id(\"office\")\nforbid (principal, action, resource) unless {{ context.source_ip.isInRange(ip(\"10.0.0.0/8\")) }};\n"
            ),
            "[]",
        );
        let path = dir.path().to_str().unwrap();
        let out = run(&[
            "explain",
            path,
            "--principal",
            "https://idp.example.org#alice",
            "--group",
            "staff",
            "--resource",
            "imap",
            "--context",
            r#"{"source_ip": "10.1.2.3"}"#,
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(text(&out).contains("decision:  allow"), "{}", text(&out));
        assert!(
            text(&out).contains("policies:  staff-only"),
            "{}",
            text(&out)
        );

        let out = run(&[
            "explain",
            path,
            "--principal",
            "https://idp.example.org#alice",
            "--group",
            "staff",
            "--resource",
            "imap",
            "--context",
            r#"{"source_ip": "192.0.2.9"}"#,
        ]);
        assert!(text(&out).contains("decision:  deny"), "{}", text(&out));
        assert!(text(&out).contains("policies:  office"), "{}", text(&out));

        // From an audit line, as the broker writes them.
        let line = r#"{"@timestamp":"2026-11-26T10:00:00Z","event":{"action":"connect.allow"},"source":{"ip":"10.9.9.9","port":1},"user":{"id":"https://idp.example.org#alice","roles":["staff"]},"postern":{"service":"imap","amr":["pwd","otp"],"auth_time":"2026-11-26T09:00:00Z","issuance":"login","device":"0000000000000000000000000000000b"}}"#;
        let out = run(&["explain", path, "--audit-line", line]);
        assert!(text(&out).contains("decision:  allow"), "{}", text(&out));
        assert!(
            text(&out).contains("\"session_age\":\"3600s\""),
            "{}",
            text(&out)
        );
    }

    #[test]
    fn fmt_checks_and_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.cedar");
        std::fs::write(&file, "permit(principal,action,resource);").unwrap();
        let out = run(&["fmt", "--check", dir.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let out = run(&["fmt", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "permit (principal, action, resource);\n"
        );
        let out = run(&["fmt", "--check", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(Path::new(&file).exists());
    }
}
