//! The conversation-test parser (a `*.test.yaml` or `tests/conversations/*.yaml` into a
//! [`TestFile`]) and the durations its `wait:` and `ago:` steps are written in: arbitrary
//! text and the repository's own tests with a few edits never panic, and give either a test
//! or a diagnostic that points inside the file. Some mutated tests are also run, against the
//! shipped flows: they pass or fail with a reason, and never panic.

use std::sync::LazyLock;

use proptest::prelude::*;

use flowgate::app::{self, Loaded};
use flowgate::conversation::{self, TestFile};
use flowgate::diagnostic::Diagnostics;
use flowgate::domain::HumanDuration;
use flowgate::yaml;

use super::{any_yaml, apply, assert_located, config, edits, files};

/// Every conversation test in the repository.
static TESTS: LazyLock<Vec<(String, String)>> = LazyLock::new(|| {
    let mut all = files("tests/conversations", "yaml", |_| false);
    all.extend(files("flows", "yaml", |name| !name.ends_with(".test.yaml")));
    all
});

/// The shipped project (the crate root is the tests' working directory).
static LOADED: LazyLock<Loaded> = LazyLock::new(|| {
    app::load(None).unwrap_or_else(|d| panic!("the project does not load:\n{}", d.render(false)))
});

/// Runs `text` as a conversation test: it passes, fails with a reason, or does not parse.
fn check_run(text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.yaml");
    std::fs::write(&path, text).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match runtime.block_on(conversation::run_file(&LOADED, &path)) {
        Ok(result) => {
            if let Some(why) = result.failure {
                assert!(!why.trim().is_empty(), "a failure without a reason");
            }
        }
        Err(diags) => assert!(diags.has_errors(), "{}", diags.render(false)),
    }
}

/// Parses `text` as `flowgate test` does, and checks the answer.
fn check_parse(file: &str, text: &str) {
    match yaml::parse::<TestFile>(file, text) {
        Ok(_) => {}
        Err(d) => {
            assert!(d.is_error());
            assert_located(&d, &[(file.to_string(), text.to_string())]);
            let mut diags = Diagnostics::default();
            diags.add_source(file, text.into());
            diags.push(*d);
            assert!(diags.render(false).contains("1 error"));
        }
    }
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn mutated_tests_parse_or_explain(which in any::<prop::sample::Index>(), edits in edits()) {
        let (file, text) = which.get(&TESTS);
        check_parse(file, &apply(text, &edits));
    }

    #[test]
    fn arbitrary_test_text_parses_or_explains(text in any_yaml()) {
        check_parse("tests/conversations/fuzz.yaml", &text);
    }

    #[test]
    fn arbitrary_durations_parse_or_explain(text in "([0-9]{1,20}[smhdw]){1,3}|[0-9smhdw -]{0,24}|.{0,12}") {
        match text.parse::<HumanDuration>() {
            Ok(d) => prop_assert!(!d.to_string().is_empty()),
            Err(e) => prop_assert!(e.to_string().contains(text.as_str())),
        }
    }

    #[test]
    fn durations_read_back_as_written(secs in 0i64..=(100 * 365 * 86_400)) {
        let d = HumanDuration(chrono::Duration::seconds(secs));
        prop_assert_eq!(d.to_string().parse::<HumanDuration>().unwrap(), d);
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn mutated_tests_run_or_fail_with_a_reason(which in any::<prop::sample::Index>(), edits in edits()) {
        let (_, text) = which.get(&TESTS);
        check_run(&apply(text, &edits));
    }
}
