//! The command line itself: the committed man pages are what the clap
//! definitions generate, the completion scripts parse, and the exit codes are
//! the documented ones (man/marsadm.1, EXIT STATUS).

mod common;

use common::{require_tool, MARSADM, MARSD};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn committed_man_pages_are_what_the_definitions_generate() {
    for (page, generated) in [
        ("man/marsadm.1", stdout_of(Command::new(MARSADM).arg("man"))),
        ("man/marsd.8", stdout_of(Command::new(MARSD).arg("--man"))),
    ] {
        let path = repo().join(page);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        assert!(
            committed == generated,
            "{page} is not what the current clap definitions generate: run scripts/gen-man.sh and commit {page}"
        );
        assert!(generated.contains(".SH \"EXIT STATUS\"") || generated.contains(".SH EXIT STATUS"));
    }
}

#[test]
fn the_man_page_names_every_visible_command() {
    let page = stdout_of(Command::new(MARSADM).arg("man"));
    let help = stdout_of(Command::new(MARSADM).arg("--help"));
    // The command list of `--help`: "  name   about" lines between
    // "Commands:" and the next empty line.
    let names: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .collect();
    assert!(names.len() > 30, "too few commands in --help: {names:?}");
    for n in names {
        assert!(
            page.contains(&format!(".SS \"{n}\"")),
            "man page lacks command {n}"
        );
    }
    assert!(!page.contains("debug-block"), "hidden commands stay hidden");
}

#[test]
fn bash_completion_parses_and_knows_the_commands() {
    require_tool("bash", "bash");
    let script = stdout_of(Command::new(MARSADM).args(["completions", "bash"]));
    for cmd in [
        "create-resource",
        "wait-resource",
        "pause-replay",
        "completions",
    ] {
        assert!(script.contains(cmd), "bash completion lacks {cmd}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("marsadm.bash");
    std::fs::write(&file, &script).expect("write the script");
    let out = output(Command::new("bash").arg("-n").arg(&file));
    assert!(
        out.status.success(),
        "bash -n refuses the completion script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Sourced, it registers a completion for marsadm.
    let out = output(
        Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && complete -p marsadm", file.display())),
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("marsadm"),
        "sourcing the script registers no completion: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And completes: a command from its start, a value from its choices.
    // (A completion function gets the command, the word being completed and
    // the word before it.)
    for (words, cword, cur_prev, want) in [
        ("marsadm create-r", 1, "create-r marsadm", "create-resource"),
        ("marsadm set-compression r0 ''", 3, "'' r0", "zstd"),
    ] {
        let out = output(Command::new("bash").arg("-c").arg(format!(
            "source {} && COMP_WORDS=({words}) && COMP_CWORD={cword} && _marsadm marsadm {cur_prev} && echo \"${{COMPREPLY[@]}}\"",
            file.display()
        )));
        let got = String::from_utf8_lossy(&out.stdout);
        assert!(got.contains(want), "completing `{words}`: {got:?}");
    }
    for shell in ["zsh", "fish"] {
        let s = stdout_of(Command::new(MARSADM).args(["completions", shell]));
        assert!(
            s.contains("create-resource"),
            "{shell} completion lacks commands"
        );
    }
}

#[test]
fn exit_codes_are_the_documented_ones() {
    // 2: the command line is wrong.
    let out = output(Command::new(MARSADM).arg("no-such-command"));
    assert_eq!(out.status.code(), Some(2));
    let out = output(Command::new(MARSADM).args(["view", "--no-such-option"]));
    assert_eq!(out.status.code(), Some(2));
    let out = output(Command::new(MARSD).arg("--no-such-option"));
    assert_eq!(out.status.code(), Some(2));
    // 1 with one line on stderr: marsd not running, or DIR no node directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = output(
        Command::new(MARSADM)
            .arg("--dir")
            .arg(dir.path())
            .arg("view"),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line on stderr: {err}");
    let out = output(Command::new(MARSD).arg("--dir").arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an initialised"), "marsd's reason: {err}");
    // 0: help, version, and commands that need no marsd.
    for args in [&["--help"][..], &["--version"], &["completions", "fish"]] {
        let out = output(Command::new(MARSADM).args(args));
        assert_eq!(out.status.code(), Some(0), "marsadm {args:?}");
    }
}
