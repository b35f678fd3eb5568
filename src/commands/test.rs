//! `flowgate test`: the conversation tests named on the command line, or by default those in
//! `tests/conversations` and beside the flows, run against the loaded project.

use std::path::PathBuf;

use crate::app::Loaded;
use crate::conversation;

/// The test files could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list the test files")]
pub struct ListError(#[source] std::io::Error);

/// What a run printed and how many tests failed.
#[derive(Debug)]
pub struct TestRun {
    pub output: String,
    pub failed: usize,
}

/// Runs the tests in `paths` (files or directories), or the default ones when it is empty.
pub async fn run(loaded: &Loaded, paths: &[PathBuf]) -> Result<TestRun, ListError> {
    let files = if paths.is_empty() {
        conversation::default_test_files(&loaded.config)
    } else {
        conversation::test_files(paths)
    }
    .map_err(ListError)?;
    let mut output = String::new();
    let (_, failed) = conversation::run_all(loaded, &files, &mut output).await;
    Ok(TestRun { output, failed })
}
