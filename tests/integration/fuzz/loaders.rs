//! The flow loader ([`load_sources`], what `check` and `serve` run on the flows directory) and
//! the config loader ([`Config::from_str`]): arbitrary text and the shipped flows and example
//! config with a few edits never panic, and always give either a loaded value or diagnostics
//! that name the file and point inside it (and render, as `check` prints them).

use std::path::Path;
use std::sync::LazyLock;

use proptest::prelude::*;

use flowgate::config::{Config, PolicyConfig};
use flowgate::diagnostic::Diagnostics;
use flowgate::flow::lint::Window;
use flowgate::flow::load::{Project, load_sources};
use flowgate::script::Scripting;
use flowgate::templates::Registry;

use super::{any_yaml, apply, assert_located, config, edits, files};

static SCRIPTING: LazyLock<Scripting> = LazyLock::new(Scripting::default);

/// The shipped flows (not their conversation tests).
static FLOWS: LazyLock<Vec<(String, String)>> =
    LazyLock::new(|| files("flows", "yaml", |name| name.ends_with(".test.yaml")));

/// The shipped templates, which the flows' template steps are checked against.
static TEMPLATES: LazyLock<Registry> = LazyLock::new(|| {
    let mut diags = Diagnostics::default();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates.yaml");
    let registry = Registry::load(&path, &mut diags);
    assert!(!diags.has_errors(), "{}", diags.render(false));
    registry
});

/// The shipped example config, which names every key.
static EXAMPLE_CONFIG: LazyLock<String> = LazyLock::new(|| {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/flowgate.yaml");
    std::fs::read_to_string(path).unwrap()
});

fn load(sources: &[(String, String)]) -> Project {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let find_script = move |name: &str| {
        let path = scripts.join(name);
        std::fs::read_to_string(&path)
            .map(|text| (format!("scripts/{name}"), text))
            .map_err(|e| format!("cannot read script `{name}`: {e}"))
    };
    load_sources(
        sources,
        &SCRIPTING,
        TEMPLATES.clone(),
        &find_script,
        None,
        Window::from_policy(&PolicyConfig::default()),
    )
}

/// Every source file either gave a flow or has an error of its own, every diagnostic is
/// located in a file it names, and the report renders.
fn check_project(project: &Project, sources: &[(String, String)]) {
    let mut all = sources.to_vec();
    all.push(("scripts/order_lookup.rhai".into(), String::new()));
    for d in &project.diagnostics.items {
        if !d.file.starts_with("scripts/") {
            assert_located(d, &all);
        }
    }
    for (file, _) in sources {
        let loaded = project.flows.iter().any(|f| f.file == *file);
        let refused = project
            .diagnostics
            .items
            .iter()
            .any(|d| d.is_error() && d.file == *file);
        assert!(
            loaded || refused,
            "`{file}` gave neither a flow nor an error:\n{}",
            project.diagnostics.render(false)
        );
    }
    let report = project.diagnostics.render(false);
    assert!(report.contains(&format!("{} error", project.diagnostics.errors())));
}

fn check_config(text: &str) {
    const FILE: &str = "flowgate.yaml";
    match Config::from_str(FILE, text, Path::new("/srv/bot")) {
        Ok(config) => assert!(!config.channels.is_empty()),
        Err(diags) => {
            assert!(
                diags.has_errors(),
                "refused without an error:\n{}",
                diags.render(false)
            );
            for d in &diags.items {
                assert_located(d, &[(FILE.to_string(), text.to_string())]);
            }
            diags.render(false);
        }
    }
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn mutated_flows_load_or_explain(which in any::<prop::sample::Index>(), edits in edits()) {
        let mut sources = FLOWS.clone();
        let i = which.index(sources.len());
        sources[i].1 = apply(&sources[i].1, &edits);
        check_project(&load(&sources), &sources);
    }

    #[test]
    fn arbitrary_flow_text_loads_or_explains(text in any_yaml()) {
        let sources = vec![("flows/fuzz.yaml".to_string(), text)];
        check_project(&load(&sources), &sources);
    }

    #[test]
    fn mutated_config_loads_or_explains(edits in edits()) {
        check_config(&apply(&EXAMPLE_CONFIG, &edits));
    }

    #[test]
    fn arbitrary_config_text_loads_or_explains(text in any_yaml()) {
        check_config(&text);
    }
}
