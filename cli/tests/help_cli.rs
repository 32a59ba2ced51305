//! Every command of `parma` explains itself with an example: `--help` of
//! the binary and of each command and subcommand, found by walking the
//! help's own command lists.

use std::process::Command;

fn help(path: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_parma")).args(path).arg("--help").output().unwrap();
    assert!(out.status.success(), "parma {path:?} --help: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The command names a help text lists under `Commands:` (without `help`).
fn commands(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_command_has_an_example() {
    let mut todo = vec![Vec::<String>::new()];
    let mut checked = 0;
    while let Some(path) = todo.pop() {
        let text = help(&path);
        let example = text.split("Example:").nth(1).unwrap_or_default();
        assert!(
            example.lines().nth(1).is_some_and(
                |line| line.trim_start().starts_with("parma ") || line.trim_start().starts_with("PARMA_CONTROL=")
            ),
            "parma {} --help has no example:\n{text}",
            path.join(" ")
        );
        for name in commands(&text) {
            let mut next = path.clone();
            next.push(name);
            todo.push(next);
        }
        checked += 1;
    }
    // The top level, 7 commands, 4 of them with subcommands of their own.
    assert!(checked >= 30, "only {checked} help texts were found");
}
