//! The recipe language: every instruction, every error message, and the
//! recipes of runtimes/.

// Integration tests are a crate of their own: no test module to sit in.
#![allow(clippy::tests_outside_test_module)]

use std::path::{Path, PathBuf};

use template::recipe::{parse, parse_file, Command, Instruction};

fn p(text: &str) -> Result<template::recipe::Recipe, template::recipe::RecipeError> {
    parse(Path::new("runtimes/x/recipe"), text)
}

#[test]
fn every_instruction_parses() {
    let r = p(r#"
# a comment
FROM debian:bookworm
RUN apt-get update \
    && apt-get install -y python3
run ["/bin/echo", "exec form"]
ENV A=1 B="two words" C=x=y
USER sandbox
WORKDIR /home/sandbox
WORKDIR work
COPY runner.py lib/ ../shared/x.txt ./
COPY "with space.txt" /opt/one.txt
LIMIT memory=512M cpu=0.5 pids=128 disk=1G timeout=90s
START python3 /opt/runner.py
READY --timeout=10s test -S /run/thaw-runner/runner.sock
"#)
    .unwrap();
    let ops: Vec<&Instruction> = r.steps.iter().map(|s| &s.instruction).collect();
    assert_eq!(r.steps[0].line, 3);
    assert_eq!(
        r.steps[1].line, 4,
        "a continued line counts from its first line"
    );
    assert_eq!(
        ops[1],
        &Instruction::Run {
            command: Command::Shell("apt-get update && apt-get install -y python3".into())
        }
    );
    assert_eq!(
        ops[2],
        &Instruction::Run {
            command: Command::Exec(vec!["/bin/echo".into(), "exec form".into()])
        }
    );
    assert_eq!(
        ops[3],
        &Instruction::Env {
            vars: vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "x=y".into())
            ]
        }
    );
    assert_eq!(
        ops[5],
        &Instruction::Workdir {
            path: PathBuf::from("/home/sandbox")
        }
    );
    assert_eq!(
        ops[6],
        &Instruction::Workdir {
            path: PathBuf::from("/home/sandbox/work")
        }
    );
    assert_eq!(
        ops[7],
        &Instruction::Copy {
            sources: vec!["runner.py".into(), "lib/".into(), "../shared/x.txt".into()],
            dest: PathBuf::from("/home/sandbox/work"),
            dest_is_dir: true,
        }
    );
    assert_eq!(
        ops[8],
        &Instruction::Copy {
            sources: vec!["with space.txt".into()],
            dest: PathBuf::from("/opt/one.txt"),
            dest_is_dir: false
        }
    );
    let s = r.summary();
    assert_eq!(s.user.as_deref(), Some("sandbox"));
    assert_eq!(s.workdir, Some(PathBuf::from("/home/sandbox/work")));
    assert_eq!(s.env["B"], "two words");
    assert_eq!(s.limits.memory_bytes, Some(512 << 20));
    assert_eq!(s.limits.cpu_millis, Some(500));
    assert_eq!(s.limits.pids, Some(128));
    assert_eq!(s.limits.disk_bytes, Some(1 << 30));
    assert_eq!(s.limits.timeout_ms, Some(90_000));
    assert_eq!(
        s.start,
        Some(Command::Shell("python3 /opt/runner.py".into()))
    );
    let (ready, timeout) = s.ready.unwrap();
    assert_eq!(timeout, 10_000);
    assert_eq!(
        ready.argv(),
        vec!["/bin/sh", "-c", "test -S /run/thaw-runner/runner.sock"]
    );
}

#[test]
fn errors_name_the_file_the_line_and_what_was_expected() {
    let cases = [
        (
            "RUN true",
            1,
            "expected FROM debian:bookworm as the first instruction",
        ),
        ("FROM ubuntu:22.04", 1, "expected FROM debian:bookworm"),
        (
            "FROM debian:bookworm\nFROM debian:bookworm",
            2,
            "FROM may appear only once",
        ),
        (
            "FROM debian:bookworm\nFETCH x",
            2,
            "unknown instruction \"FETCH\" (expected one of FROM, RUN",
        ),
        ("FROM debian:bookworm\n\nRUN", 3, "RUN needs a command"),
        (
            "FROM debian:bookworm\nRUN [\"unterminated\"",
            2,
            "expected a JSON array of strings",
        ),
        (
            "FROM debian:bookworm\nRUN []",
            2,
            "the exec form needs a program",
        ),
        (
            "FROM debian:bookworm\nENV NOVALUE",
            2,
            "expected KEY=VALUE, found \"NOVALUE\"",
        ),
        (
            "FROM debian:bookworm\nENV 1X=2",
            2,
            "expected a variable name",
        ),
        (
            "FROM debian:bookworm\nENV A=\"open",
            2,
            "unterminated double quote",
        ),
        (
            "FROM debian:bookworm\nUSER Root!",
            2,
            "expected a user name",
        ),
        (
            "FROM debian:bookworm\nCOPY only-one",
            2,
            "COPY needs at least one source and a destination",
        ),
        (
            "FROM debian:bookworm\nCOPY /etc/passwd /x",
            2,
            "must be a path relative to the runtime folder",
        ),
        (
            "FROM debian:bookworm\nLIMIT memory=lots",
            2,
            "expected a size such as 512M",
        ),
        (
            "FROM debian:bookworm\nLIMIT cpu=-1",
            2,
            "expected a number of CPUs",
        ),
        (
            "FROM debian:bookworm\nLIMIT gpus=1",
            2,
            "unknown limit \"gpus\"",
        ),
        (
            "FROM debian:bookworm\nLIMIT timeout=soon",
            2,
            "expected a duration",
        ),
        (
            "FROM debian:bookworm\nREADY true",
            2,
            "READY must come after START",
        ),
        (
            "FROM debian:bookworm\nSTART a\nSTART b",
            3,
            "START may appear only once",
        ),
        (
            "FROM debian:bookworm\nSTART a\nREADY --timeout=1h x",
            3,
            "READY --timeout: expected a duration",
        ),
        (
            "FROM debian:bookworm\nSTART a\nREADY --timeout=5s",
            3,
            "READY needs a command after its options",
        ),
        (
            "FROM debian:bookworm\nSTART a\nREADY a\nREADY b",
            4,
            "READY may appear only once",
        ),
        ("# only a comment\n", 1, "empty recipe"),
    ];
    for (text, line, expected) in cases {
        let e = p(text).unwrap_err();
        assert_eq!(e.line, line, "{text:?}: {e}");
        assert!(e.message.contains(expected), "{text:?}: got {e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("runtimes/x/recipe:{line}: ")),
            "{shown}"
        );
    }
}

#[test]
fn the_runtimes_recipes_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runtimes");
    for name in ["python", "node", "bash"] {
        let r = parse_file(&root.join(name).join("recipe")).unwrap_or_else(|e| panic!("{e}"));
        let s = r.summary();
        assert!(s.start.is_some(), "{name} has no START");
        assert!(s.ready.is_some(), "{name} has no READY");
        assert_eq!(s.user.as_deref(), Some("sandbox"), "{name}");
    }
    let missing = parse_file(&root.join("nope/recipe")).unwrap_err();
    assert!(
        missing.message.contains("cannot read the recipe"),
        "{missing}"
    );
}
