//! The README and the example config cannot drift from the program.
//!
//! Each transcript of program output in `README.md` is marked `<!-- transcript: NAME -->`
//! before its fenced block, whose first line is the command (`$ flowgate …`, or `$ cargo run
//! --release -- …`) and, for `chat`, whose `you> ` lines are what the customer typed. The test
//! of each runs that command through the real binary (its setup below, by NAME) and compares
//! what it printed with the block; on a difference it fails and prints the fresh transcript.
//! `FLOWGATE_BLESS=1 cargo test --test integration readme::` writes the fresh transcripts into
//! the README instead.
//!
//! `examples/flowgate.yaml` shows every key `flowgate.yaml` accepts: the list comes from the
//! config loader itself (`flowgate::config::keys`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use tokio::io::AsyncWriteExt;

const README: &str = "README.md";
const MARK: &str = "<!-- transcript: ";

/// Blessing rewrites the README; one test at a time.
static README_LOCK: Mutex<()> = Mutex::new(());

/// The fenced block after `<!-- transcript: NAME -->`: its lines, and the byte range of
/// its content (between the fences) in `readme`.
fn block(readme: &str, name: &str) -> (Vec<String>, std::ops::Range<usize>) {
    let mark = format!("{MARK}{name} -->\n");
    let at = readme
        .find(&mark)
        .unwrap_or_else(|| panic!("README.md has no `{}`", mark.trim_end()));
    let fence = at + mark.len();
    assert!(
        readme[fence..].starts_with("```"),
        "a fenced block follows `{}` in README.md",
        mark.trim_end()
    );
    let start = fence + readme[fence..].find('\n').expect("the fence line ends") + 1;
    let end = start
        + readme[start..]
            .find("\n```")
            .expect("the transcript's block is closed")
        + 1;
    let lines = readme[start..end].lines().map(str::to_string).collect();
    (lines, start..end)
}

/// The fenced block just before the transcript `name` whose fence is ```` ```kind ````
/// (e.g. the CSV file an import reads).
fn block_before(readme: &str, name: &str, kind: &str) -> String {
    let at = readme
        .find(&format!("{MARK}{name} -->"))
        .expect("the transcript is marked");
    let fence = format!("```{kind}\n");
    let start = readme[..at].rfind(&fence).expect("a block before it") + fence.len();
    let end = start + readme[start..].find("```").expect("closed");
    readme[start..end].to_string()
}

/// The arguments of the block's first line, `$ flowgate ARGS` or `$ cargo run --release --
/// ARGS`.
fn command(first: &str) -> Vec<String> {
    let args = first
        .strip_prefix("$ flowgate ")
        .or_else(|| first.strip_prefix("$ cargo run --release -- "))
        .unwrap_or_else(|| panic!("a transcript starts with its command, not {first:?}"));
    args.split_whitespace().map(str::to_string).collect()
}

/// Runs `flowgate ARGS` in `dir` with `input` on stdin; stdout and stderr as one text, as a
/// terminal shows them (stdout first: the commands here print to one of them).
async fn run(dir: &Path, args: &[String], input: &str) -> String {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("flowgate starts");
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("flowgate {args:?} finishes within 60 s"))
        .expect("flowgate runs");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("UTF-8 output");
    format!("{}{}", text(out.stdout), text(out.stderr))
}

/// A chat's output with what the customer typed put back after each `you> ` prompt.
fn with_input(output: &str, typed: &[String]) -> String {
    let mut parts = output.split("you> ");
    let mut out = parts.next().unwrap_or_default().to_string();
    for (line, reply) in typed.iter().zip(parts) {
        out.push_str(&format!("you> {line}\n{reply}"));
    }
    out
}

/// The transcript `name` as the program prints it now, in `dir` (the block gives the
/// command and what the customer typed).
async fn fresh(name: &str, lines: &[String], dir: &Path) -> String {
    let args = command(&lines[0]);
    let typed: Vec<String> = lines[1..]
        .iter()
        .filter_map(|l| l.strip_prefix("you> ").map(str::to_string))
        .collect();
    let input: String = typed.iter().map(|l| format!("{l}\n")).collect();
    let output = run(dir, &args, &input).await;
    let body = if typed.is_empty() {
        output
    } else {
        with_input(&output, &typed)
    };
    assert!(!body.trim().is_empty(), "`{name}` printed nothing");
    format!("{}\n{body}", lines[0])
}

/// Compares the README's transcript `name` with the program run in `dir`; with
/// `FLOWGATE_BLESS=1`, writes the fresh one into the README.
async fn transcript(name: &str, dir: &Path) {
    let readme = std::fs::read_to_string(README).expect("README.md reads");
    let (lines, range) = block(&readme, name);
    let fresh = fresh(name, &lines, dir).await;
    let written = &readme[range.clone()];
    if written == fresh {
        return;
    }
    if std::env::var_os("FLOWGATE_BLESS").is_some() {
        let _guard = README_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let readme = std::fs::read_to_string(README).expect("README.md reads");
        let (_, range) = block(&readme, name);
        let mut updated = readme.clone();
        updated.replace_range(range, &fresh);
        std::fs::write(README, updated).expect("README.md writes");
        return;
    }
    panic!(
        "README.md's transcript `{name}` is not what the program prints. The program printed:\n\
         {fresh}\n(FLOWGATE_BLESS=1 cargo test --test integration readme:: writes it into \
         README.md)\nREADME.md has:\n{written}"
    );
}

/// The repository's root, where `flowgate` with no config runs the shipped examples.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of the shipped project (flows, scripts, templates) in a temp dir.
fn shipped_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["flows", "scripts"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(root().join(sub)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(sub).join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        root().join("templates.yaml"),
        dir.path().join("templates.yaml"),
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn the_chat_transcript_is_what_chat_prints() {
    transcript("chat", &root()).await;
}

/// A customer's file in `chat`: `/image PATH` to `examples/parcel`, whose flow goes on.
#[tokio::test]
async fn the_chat_file_transcript_is_what_chat_prints() {
    transcript("chat-file", &root()).await;
}

#[tokio::test]
async fn the_test_transcript_is_what_test_prints() {
    transcript("test", &root()).await;
}

/// The README's example of the window warning: the shipped `order_status` without its
/// `follow_up` step's `outside_window`.
#[tokio::test]
async fn the_window_warning_is_what_check_prints() {
    let dir = shipped_copy();
    let path = dir.path().join("flows/order_status.yaml");
    let flow = std::fs::read_to_string(&path).unwrap();
    let fallback = "    outside_window:\n      template: parcel_check\n      language: en_US\n      params: [\"{{order_id}}\"]\n";
    assert!(
        flow.contains(fallback),
        "flows/order_status.yaml's `follow_up` has its `outside_window` (update this test if it moved)"
    );
    std::fs::write(&path, flow.replace(fallback, "")).unwrap();
    transcript("check-window-warning", dir.path()).await;
}

/// The README's import: its CSV file, on a config with one channel, `main`.
#[tokio::test]
async fn the_import_transcript_is_what_contacts_import_prints() {
    let dir = tempfile::tempdir().unwrap();
    let readme = std::fs::read_to_string(README).unwrap();
    let csv = block_before(&readme, "contacts-import", "csv");
    std::fs::write(dir.path().join("customers.csv"), csv).unwrap();
    std::fs::write(
        dir.path().join("flowgate.yaml"),
        format!(
            "database: sqlite://{}\nflows: {}\nscripts: {}\ntemplates: {}\nchannels:\n  - name: main\n    provider: sandbox\n",
            dir.path().join("flowgate.db").display(),
            root().join("flows").display(),
            root().join("scripts").display(),
            root().join("templates.yaml").display(),
        ),
    )
    .unwrap();
    transcript("contacts-import", dir.path()).await;
}

/// The dotted keys written in `text`, commented out or not: a line `key:` (or `- key:`)
/// after optional `# `, nested by its indentation.
fn written_keys(text: &str) -> Vec<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut keys = Vec::new();
    for line in text.lines() {
        // `  # - name: main` reads as `  - name: main`: the comment marker takes no room.
        let margin = line.len() - line.trim_start().len();
        let line = match line[margin..].strip_prefix("# ") {
            Some(rest) => format!("{}{rest}", &line[..margin]),
            None => line.to_string(),
        };
        let indent = line.len() - line.trim_start().len();
        let rest = line.trim_start();
        let (column, rest) = match rest.strip_prefix("- ") {
            Some(item) => (indent + 2, item),
            None => (indent, rest),
        };
        let key: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if key.is_empty() || !rest[key.len()..].starts_with(':') {
            continue;
        }
        stack.retain(|(c, _)| *c < column);
        let path: Vec<&str> = stack
            .iter()
            .map(|(_, k)| k.as_str())
            .chain([key.as_str()])
            .collect();
        keys.push(path.join("."));
        stack.push((column, key));
    }
    keys
}

#[test]
fn the_example_config_shows_every_key() {
    let text = std::fs::read_to_string("examples/flowgate.yaml").unwrap();
    let written = written_keys(&text);
    let missing: Vec<String> = flowgate::config::keys()
        .into_iter()
        .filter(|k| !written.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "examples/flowgate.yaml lacks keys flowgate.yaml accepts: {missing:?}; add each with \
         a one-line comment (commented out when it must not be active by default)"
    );
    // And it still loads, with nothing to report (`check` runs it through the binary in
    // `check::example_campaign_passes_check`).
    match flowgate::app::load(Some(Path::new("examples/flowgate.yaml"))) {
        Ok(loaded) => assert_eq!(loaded.project.diagnostics.items, []),
        Err(diags) => panic!("examples/flowgate.yaml: {}", diags.render(false)),
    }
}

#[test]
fn written_keys_follow_indentation_and_comments() {
    let text = "a: 1\nb:\n  - c: 2\n  #   d: x\n  # e:\n# f: 3\n# Some prose: not a key\n";
    assert_eq!(written_keys(text), ["a", "b", "b.c", "b.d", "b.e", "f"]);
}
