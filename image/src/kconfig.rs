//! Check that every option the fragments in `kernel-config/` ask for
//! survived `make olddefconfig` (which silently drops an option whose
//! dependencies are not met).

use std::collections::HashMap;

/// What a fragment asks of one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// `CONFIG_...`.
    pub option: String,
    /// The value asked for (`y`, `"string"`, a number), or `None` for "is not set".
    pub value: Option<String>,
    /// Where it was asked: `file:line`.
    pub origin: String,
}

/// An option whose final value differs from what a fragment asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{option}: {origin} asks for {}, the final config has {}", show(.wanted), show(.got))]
pub struct Mismatch {
    /// `CONFIG_...`.
    pub option: String,
    /// What the fragment asked.
    pub wanted: Option<String>,
    /// What the final config has.
    pub got: Option<String>,
    /// Where it was asked.
    pub origin: String,
}

fn show(value: &Option<String>) -> String {
    match value {
        Some(value) => format!("={value}"),
        None => "is not set".into(),
    }
}

/// One config line: `CONFIG_X=v` gives `(X, Some(v))`, `# CONFIG_X is not set` gives `(X, None)`.
fn parse_line(line: &str) -> Option<(&str, Option<&str>)> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# ") {
        let option = rest.strip_suffix(" is not set")?;
        return option.starts_with("CONFIG_").then_some((option, None));
    }
    let (option, value) = line.split_once('=')?;
    option.starts_with("CONFIG_").then_some((option, Some(value)))
}

/// The requirements of one fragment, named `name` in messages.
pub fn requirements(name: &str, fragment: &str) -> Vec<Requirement> {
    fragment
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let (option, value) = parse_line(line)?;
            Some(Requirement {
                option: option.to_string(),
                value: value.map(str::to_string),
                origin: format!("{name}:{}", i + 1),
            })
        })
        .collect()
}

/// Every requirement the final `.config` does not meet.
pub fn check(config: &str, requirements: &[Requirement]) -> Vec<Mismatch> {
    let values: HashMap<&str, Option<&str>> = config.lines().filter_map(parse_line).collect();
    requirements
        .iter()
        .filter_map(|req| {
            let got = values.get(req.option.as_str()).copied().flatten();
            (got != req.value.as_deref()).then(|| Mismatch {
                option: req.option.clone(),
                wanted: req.value.clone(),
                got: got.map(str::to_string),
                origin: req.origin.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "CONFIG_64BIT=y\n# CONFIG_MODULES is not set\nCONFIG_STATIC_USERMODEHELPER_PATH=\"\"\n";

    #[test]
    fn met_requirements_pass() {
        let reqs = requirements(
            "a.config",
            "# comment\nCONFIG_64BIT=y\n# CONFIG_MODULES is not set\nCONFIG_STATIC_USERMODEHELPER_PATH=\"\"\n",
        );
        assert_eq!(reqs.len(), 3);
        assert!(check(CONFIG, &reqs).is_empty());
    }

    #[test]
    fn dropped_and_unwanted_options_are_named() {
        let reqs = requirements("b.config", "CONFIG_SLAB_FREELIST_RANDOM=y\n# CONFIG_64BIT is not set\n");
        let mismatches = check(CONFIG, &reqs);
        assert_eq!(mismatches.len(), 2);
        assert_eq!(
            mismatches[0].to_string(),
            "CONFIG_SLAB_FREELIST_RANDOM: b.config:1 asks for =y, the final config has is not set"
        );
        assert_eq!(mismatches[1].to_string(), "CONFIG_64BIT: b.config:2 asks for is not set, the final config has =y");
    }

    #[test]
    fn an_absent_option_counts_as_not_set() {
        let reqs = requirements("c.config", "# CONFIG_KEXEC is not set\n");
        assert!(check(CONFIG, &reqs).is_empty());
    }
}
