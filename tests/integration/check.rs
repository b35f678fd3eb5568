//! `flowgate check` points at the right place: one small project per problem under
//! `tests/fixtures/check/<case>/`, its diagnostics rendered without colour and snapshotted
//! (`tests/integration/snapshots/integration__check__<case>.snap`), so a caret that moves shows up in review.
//!
//! Integration tests run with the crate root as the working directory, and the fixtures are
//! named by relative paths, so the file names in the snapshots are stable.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flowgate::app;
use flowgate::diagnostic::Diagnostics;

const FIXTURES: &str = "tests/fixtures/check";

fn config_of(case: &str) -> PathBuf {
    Path::new(FIXTURES).join(case).join("flowgate.yaml")
}

/// Everything `check` would report for the fixture `case`.
fn diagnostics(case: &str) -> Diagnostics {
    match app::load(Some(&config_of(case))) {
        Ok(loaded) => loaded.project.diagnostics,
        Err(diags) => *diags,
    }
}

/// Snapshots the rendered diagnostics of `case` and checks how many errors and warnings
/// there are, so a snapshot accepted by mistake still cannot hide a lost diagnostic.
fn check(case: &str, errors: usize, warnings: usize) -> Diagnostics {
    let diags = diagnostics(case);
    let rendered = diags.render(false);
    insta::assert_snapshot!(case, rendered);
    assert_eq!(
        (diags.errors(), diags.warnings()),
        (errors, warnings),
        "errors and warnings of `{case}`:\n{rendered}"
    );
    diags
}

/// The one diagnostic of `case` is at `position` (`file:line:col`) and its help says `help`.
fn check_one(case: &str, position: &str, help: Option<&str>) {
    let diags = check(case, 1, 0);
    let d = &diags.items[0];
    assert_eq!(d.position(), position, "{}", diags.render(false));
    if let Some(help) = help {
        let actual = d.help.as_deref().unwrap_or_default();
        assert!(actual.contains(help), "help of `{case}`: {actual:?}");
    }
}

fn fixture_file(case: &str, file: &str) -> String {
    format!("{FIXTURES}/{case}/{file}")
}

// --- YAML and unknown keys -------------------------------------------------------------------

#[test]
fn yaml_syntax_error() {
    let diags = check("yaml_syntax", 1, 0);
    assert!(
        diags.items[0]
            .position()
            .starts_with(&fixture_file("yaml_syntax", "flows/greet.yaml:10:"))
    );
}

#[test]
fn unknown_key_in_a_step() {
    let file = fixture_file("unknown_step_key", "flows/greet.yaml");
    check_one("unknown_step_key", &format!("{file}:9:5"), None);
}

#[test]
fn unknown_key_in_the_config() {
    let file = fixture_file("unknown_config_key", "flowgate.yaml");
    check_one("unknown_config_key", &format!("{file}:7:3"), None);
}

// --- references to steps and flows -----------------------------------------------------------

#[test]
fn goto_to_a_missing_step() {
    let file = fixture_file("unknown_goto", "flows/greet.yaml");
    check_one(
        "unknown_goto",
        &format!("{file}:7:11"),
        Some("did you mean `farewell`?"),
    );
}

#[test]
fn next_to_a_missing_step() {
    let file = fixture_file("unknown_next", "flows/greet.yaml");
    check_one(
        "unknown_next",
        &format!("{file}:7:11"),
        Some("did you mean `farewell`?"),
    );
}

#[test]
fn branch_goto_to_a_missing_step() {
    let file = fixture_file("unknown_next_branch", "flows/greet.yaml");
    check_one(
        "unknown_next_branch",
        &format!("{file}:14:15"),
        Some("did you mean `farewell`?"),
    );
}

#[test]
fn on_fail_to_a_missing_step() {
    let file = fixture_file("unknown_on_fail", "flows/ask.yaml");
    check_one(
        "unknown_on_fail",
        &format!("{file}:10:14"),
        Some("did you mean `give_up`?"),
    );
}

#[test]
fn on_timeout_to_a_missing_step() {
    let file = fixture_file("unknown_on_timeout", "flows/ask.yaml");
    check_one(
        "unknown_on_timeout",
        &format!("{file}:10:17"),
        Some("did you mean `timed_out`?"),
    );
}

#[test]
fn on_error_to_a_missing_step() {
    let file = fixture_file("unknown_on_error", "flows/lookup.yaml");
    check_one(
        "unknown_on_error",
        &format!("{file}:7:15"),
        Some("did you mean `lookup_failed`?"),
    );
}

#[test]
fn flow_to_a_missing_flow() {
    let file = fixture_file("unknown_flow", "flows/main_menu.yaml");
    check_one(
        "unknown_flow",
        &format!("{file}:12:15"),
        Some("did you mean `order_status`?"),
    );
}

#[test]
fn start_at_a_missing_step() {
    let file = fixture_file("unknown_start", "flows/greet.yaml");
    check_one(
        "unknown_start",
        &format!("{file}:4:8"),
        Some("did you mean `hello`?"),
    );
}

// --- templates -------------------------------------------------------------------------------

#[test]
fn template_that_does_not_exist() {
    let file = fixture_file("unknown_template", "flows/notify.yaml");
    check_one(
        "unknown_template",
        &format!("{file}:7:13"),
        Some("did you mean `order_shipped`?"),
    );
}

#[test]
fn template_in_a_missing_language() {
    let file = fixture_file("template_language", "flows/notify.yaml");
    check_one(
        "template_language",
        &format!("{file}:8:17"),
        Some("en_US, de_DE"),
    );
}

#[test]
fn template_with_the_wrong_parameter_count() {
    let file = fixture_file("template_params", "flows/notify.yaml");
    check_one("template_params", &format!("{file}:10:16"), None);
}

// --- reachability ----------------------------------------------------------------------------

#[test]
fn unreachable_step_is_a_warning() {
    let diags = check("unreachable", 0, 1);
    let file = fixture_file("unreachable", "flows/greet.yaml");
    assert_eq!(diags.items[0].position(), format!("{file}:10:3"));
}

// --- the window lint -------------------------------------------------------------------------

/// The positions of every diagnostic of `diags`, in file order.
fn positions(diags: &Diagnostics) -> Vec<String> {
    diags.sorted().iter().map(|d| d.position()).collect()
}

#[test]
fn window_lint_warns_after_a_long_wait_without_a_fallback() {
    // `follow_up` (wait 26h, no fallback) and the script's `reply` warn; the step with
    // `outside_window` and the `template` step do not.
    let diags = check("window_wait", 0, 2);
    let file = fixture_file("window_wait", "flows/parcel.yaml");
    assert_eq!(
        positions(&diags),
        [format!("{file}:10:10"), format!("{file}:29:11")]
    );
    let sorted = diags.sorted();
    assert!(
        sorted[0]
            .message
            .contains("after `wait: 26h`, when the 24h window is closed")
    );
    assert!(
        sorted[0]
            .help
            .as_deref()
            .unwrap_or_default()
            .contains("outside_window")
    );
    assert!(
        sorted[1]
            .message
            .contains("a `reply` of its script will be queued")
    );
}

#[test]
fn window_lint_follows_an_ask_timeout() {
    // `nudge` runs 25h after the question; `bye` runs at most 2h after the answer.
    let diags = check("window_ask_timeout", 0, 1);
    let file = fixture_file("window_ask_timeout", "flows/survey.yaml");
    assert_eq!(positions(&diags), [format!("{file}:23:10")]);
    assert!(
        diags.items[0]
            .message
            .contains("`timeout: 25h` in step `rate`")
    );
}

#[test]
fn window_lint_propagates_until_a_reply_and_adds_waits_up() {
    // `pause` (2d) reaches `remind` and `offer` through `if` branches and `confirm` through
    // `goto`; the ask's own question is at risk, the step after its answer is not; 12h and
    // 13h without a reply add up to more than the window.
    let diags = check("window_propagation", 0, 4);
    let file = fixture_file("window_propagation", "flows/renewal.yaml");
    assert_eq!(
        positions(&diags),
        [17, 20, 23, 33].map(|line| format!("{file}:{line}:10"))
    );
    assert!(
        diags.sorted()[3]
            .message
            .contains("up to 25h after the customer's last message")
    );
}

#[test]
fn window_lint_follows_a_flow_jump() {
    let diags = check("window_flow_jump", 0, 1);
    let file = fixture_file("window_flow_jump", "flows/feedback.yaml");
    assert_eq!(positions(&diags), [format!("{file}:6:10")]);
    assert!(
        diags.items[0]
            .message
            .contains("in step `wait_a_week` of flow `reorder`")
    );
}

#[test]
fn window_lint_is_quiet_on_a_normal_reply_path() {
    // Short timeouts, a long wait with `outside_window`, and a wait after a reply.
    check("window_reply_path", 0, 0);
}

// --- regexes ---------------------------------------------------------------------------------

#[test]
fn trigger_regex_that_does_not_compile() {
    let file = fixture_file("bad_trigger_regex", "flows/order.yaml");
    check_one("bad_trigger_regex", &format!("{file}:4:13"), None);
}

#[test]
fn expect_regex_that_does_not_compile() {
    let file = fixture_file("bad_expect_regex", "flows/order.yaml");
    check_one("bad_expect_regex", &format!("{file}:8:23"), None);
}

#[test]
fn match_regex_that_does_not_compile() {
    let file = fixture_file("bad_match_regex", "flows/order.yaml");
    check_one("bad_match_regex", &format!("{file}:8:17"), None);
}

// --- Rhai ------------------------------------------------------------------------------------

#[test]
fn script_file_that_does_not_compile() {
    let file = fixture_file("bad_script_file", "scripts/lookup.rhai");
    check_one(
        "bad_script_file",
        &format!("{file}:7:5"),
        Some("used by step `lookup`"),
    );
}

#[test]
fn inline_script_that_does_not_compile() {
    let file = fixture_file("bad_inline_rhai", "flows/check.yaml");
    check_one("bad_inline_rhai", &format!("{file}:10:44"), None);
}

#[test]
fn quoted_one_line_script_that_does_not_compile() {
    let file = fixture_file("bad_inline_rhai_quoted", "flows/tag.yaml");
    check_one("bad_inline_rhai_quoted", &format!("{file}:9:31"), None);
}

#[test]
fn if_condition_that_does_not_compile() {
    let file = fixture_file("bad_if", "flows/order.yaml");
    check_one("bad_if", &format!("{file}:7:36"), None);
}

#[test]
fn interpolation_that_does_not_compile() {
    let file = fixture_file("bad_interpolation", "flows/order.yaml");
    check_one("bad_interpolation", &format!("{file}:9:44"), None);
}

// --- WhatsApp's limits on literal text -------------------------------------------------------

#[test]
fn four_buttons() {
    let file = fixture_file("too_many_buttons", "flows/menu.yaml");
    check_one("too_many_buttons", &format!("{file}:11:9"), None);
}

#[test]
fn button_title_over_20_characters() {
    let file = fixture_file("long_button_title", "flows/menu.yaml");
    check_one("long_button_title", &format!("{file}:9:30"), None);
}

#[test]
fn eleven_list_rows() {
    let file = fixture_file("too_many_rows", "flows/menu.yaml");
    check_one("too_many_rows", &format!("{file}:20:11"), None);
}

#[test]
fn row_title_over_24_characters() {
    let file = fixture_file("long_row_title", "flows/menu.yaml");
    check_one("long_row_title", &format!("{file}:13:36"), None);
}

#[test]
fn body_over_4096_characters() {
    let file = fixture_file("long_body", "flows/news.yaml");
    check_one("long_body", &format!("{file}:10:7"), None);
}

#[test]
fn body_over_1024_characters_with_buttons() {
    let file = fixture_file("long_button_body", "flows/news.yaml");
    check_one("long_button_body", &format!("{file}:10:7"), None);
}

#[test]
fn duplicate_button_titles() {
    let file = fixture_file("duplicate_button_titles", "flows/menu.yaml");
    check_one("duplicate_button_titles", &format!("{file}:10:33"), None);
}

// --- across flows ----------------------------------------------------------------------------

#[test]
fn duplicate_flow_ids_across_files() {
    let first = fixture_file("duplicate_flow_ids", "flows/menu.yaml");
    let second = fixture_file("duplicate_flow_ids", "flows/menu_copy.yaml");
    check_one(
        "duplicate_flow_ids",
        &format!("{second}:4:7"),
        Some(&format!("the first is at {first}:1:7")),
    );
}

#[test]
fn trigger_conflicts_at_the_same_priority_only() {
    let first = fixture_file("trigger_conflict", "flows/a_orders.yaml");
    let second = fixture_file("trigger_conflict", "flows/b_returns.yaml");
    check_one(
        "trigger_conflict",
        &format!("{second}:4:16"),
        Some(&format!("see {first}:3:23")),
    );
}

// --- step shape ------------------------------------------------------------------------------

#[test]
fn step_with_two_actions() {
    let file = fixture_file("two_actions", "flows/ask.yaml");
    check_one(
        "two_actions",
        &format!("{file}:7:10"),
        Some("split it into two steps"),
    );
}

#[test]
fn save_without_ask() {
    let file = fixture_file("save_without_ask", "flows/greet.yaml");
    check_one("save_without_ask", &format!("{file}:7:11"), None);
}

#[test]
fn unknown_expect_kind() {
    let file = fixture_file("unknown_expect", "flows/ask.yaml");
    check_one(
        "unknown_expect",
        &format!("{file}:8:13"),
        Some("did you mean `email`?"),
    );
}

/// A file kind that is misspelt, alone or in a list, is named with its place and the
/// nearest kind.
#[test]
fn unknown_media_expect_kinds() {
    let diags = check("unknown_media_expect", 2, 0);
    let file = fixture_file("unknown_media_expect", "flows/photo.yaml");
    let found: Vec<(String, String, String)> = diags
        .items
        .iter()
        .map(|d| {
            (
                d.position(),
                d.message.clone(),
                d.help.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(found[0].0, format!("{file}:8:13"), "{found:?}");
    assert!(
        found[0].1.contains("`documnet` is not a kind of file"),
        "{found:?}"
    );
    assert!(found[0].2.contains("did you mean `document`?"), "{found:?}");
    assert_eq!(found[1].0, format!("{file}:15:13"), "{found:?}");
    assert!(found[1].2.contains("did you mean `image`?"), "{found:?}");
}

#[test]
fn missing_script_file() {
    let file = fixture_file("missing_script", "flows/lookup.yaml");
    check_one("missing_script", &format!("{file}:6:13"), None);
    let d = &diagnostics("missing_script").items[0];
    assert!(
        d.message.contains("did you mean `order_lookup.rhai`?"),
        "{}",
        d.message
    );
}

// --- campaigns -------------------------------------------------------------------------------

#[test]
fn campaign_with_many_problems_names_each_place() {
    // channel, category, a parameter naming a flow variable, cron, time zone, quiet hours,
    // rate, `on_reply`: one error each, at its value.
    let diags = check("campaign_broken", 8, 0);
    let file = fixture_file("campaign_broken", "campaigns/spring.yaml");
    let expected: Vec<String> = [
        "2:10", "4:19", "4:81", "6:12", "7:11", "8:36", "9:7", "10:11",
    ]
    .iter()
    .map(|at| format!("{file}:{at}"))
    .collect();
    assert_eq!(positions(&diags), expected);
    let sorted = diags.sorted();
    assert_eq!(sorted[0].help.as_deref(), Some("did you mean `main`?"));
    assert!(sorted[1].message.contains("is a utility template"));
    assert!(
        sorted[3]
            .label
            .as_deref()
            .unwrap_or_default()
            .contains("illegal character"),
        "croner's reason: {:?}",
        sorted[3].label
    );
    assert_eq!(
        sorted[4].help.as_deref(),
        Some("did you mean `Europe/Berlin`?")
    );
    assert_eq!(sorted[7].help.as_deref(), Some("did you mean `sale_flow`?"));
}

#[test]
fn campaign_templates_unknown_miscounted_paused_and_rejected() {
    let diags = check("campaign_templates", 3, 1);
    let at = |name: &str, pos: &str| {
        format!(
            "{}:{pos}",
            fixture_file("campaign_templates", &format!("campaigns/{name}.yaml"))
        )
    };
    assert_eq!(
        positions(&diags),
        [
            at("autumn", "3:19"),
            at("spring", "3:78"),
            at("summer", "3:19"),
            at("winter", "3:19")
        ]
    );
    let sorted = diags.sorted();
    assert!(!sorted[2].is_error(), "a paused template only warns");
    assert!(sorted[3].message.contains("is rejected"));
}

#[test]
fn a_campaigns_split_is_checked_variant_by_variant() {
    // The second variant: a name the first has, a weight of 0, an unknown template; the
    // third's template is paused (a warning, as for `template:`).
    let diags = check("campaign_split", 3, 1);
    let at = |pos: &str| {
        format!(
            "{}:{pos}",
            fixture_file("campaign_split", "campaigns/spring.yaml")
        )
    };
    assert_eq!(
        positions(&diags),
        [at("5:13"), at("5:28"), at("5:49"), at("6:49")]
    );
    let sorted = diags.sorted();
    assert!(
        sorted[0]
            .message
            .contains("two variants of this split are named `short`")
    );
    assert!(
        sorted[1]
            .message
            .contains("a variant's weight is a whole number above zero")
    );
    assert_eq!(
        sorted[2].help.as_deref(),
        Some("did you mean `spring_sale`?")
    );
    assert!(!sorted[3].is_error() && sorted[3].message.contains("is paused"));
}

#[test]
fn unknown_key_in_a_campaign() {
    let file = fixture_file("campaign_unknown_key", "campaigns/spring.yaml");
    check_one(
        "campaign_unknown_key",
        &format!("{file}:6:1"),
        Some("did you mean `quiet_hours`?"),
    );
}

#[test]
fn two_campaigns_with_one_name() {
    let first = fixture_file("campaign_duplicate", "campaigns/a_spring.yaml");
    let second = fixture_file("campaign_duplicate", "campaigns/b_spring_again.yaml");
    check_one(
        "campaign_duplicate",
        &format!("{second}:2:11"),
        Some(&format!("the first is at {first}:1:11")),
    );
}

#[test]
fn window_lint_covers_a_campaigns_on_reply_flow() {
    let diags = check("campaign_on_reply", 0, 1);
    let file = fixture_file("campaign_on_reply", "flows/sale.yaml");
    assert_eq!(positions(&diags), [format!("{file}:8:10")]);
    let loaded = app::load(Some(&config_of("campaign_on_reply"))).expect("only a warning");
    let campaigns = &loaded.project.campaigns;
    assert_eq!(campaigns.len(), 1);
    assert_eq!(campaigns[0].on_reply.as_deref(), Some("sale_flow"));
}

#[test]
fn campaigns_inside_the_flows_directory_are_not_flows() {
    check("campaigns_inside_flows", 0, 0);
    let loaded = app::load(Some(&config_of("campaigns_inside_flows"))).expect("no errors");
    assert_eq!(loaded.project.flows.len(), 1);
    assert_eq!(loaded.project.campaigns.len(), 1);
}

#[test]
fn example_campaign_passes_check() {
    let config = Path::new("examples/flowgate.yaml");
    let loaded = match app::load(Some(config)) {
        Ok(loaded) => loaded,
        Err(diags) => panic!("the example has errors:\n{}", diags.render(false)),
    };
    let campaigns = &loaded.project.campaigns;
    assert_eq!(
        campaigns.len(),
        2,
        "examples/campaigns/spring_sale.yaml and spring_sale_ab.yaml load"
    );
    assert_eq!(campaigns[0].name, "spring_sale");
    assert_eq!(campaigns[0].file, "examples/campaigns/spring_sale.yaml");
    assert_eq!(campaigns[1].name, "spring_sale_ab");
    assert!(
        campaigns[1].is_split(),
        "the A/B example splits its template"
    );
    // The shipped flows are clean and the campaign adds no warning.
    let diags = &loaded.project.diagnostics;
    assert_eq!(
        (diags.errors(), diags.warnings()),
        (0, 0),
        "{}",
        diags.render(false)
    );
    let out = flowgate_check(Some(config), &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("0 errors, 0 warnings"), "{stdout}");
}

// --- the shipped project ---------------------------------------------------------------------

#[test]
fn shipped_project_is_clean() {
    let loaded = match app::load(None) {
        Ok(loaded) => loaded,
        Err(diags) => panic!("the shipped project has errors:\n{}", diags.render(false)),
    };
    // The examples a new user runs first print nothing: `follow_up`, 26 h after the last
    // reply, has the `parcel_check` template for the closed window.
    let diags = &loaded.project.diagnostics;
    assert_eq!(
        (diags.errors(), diags.warnings()),
        (0, 0),
        "{}",
        diags.render(false)
    );
    assert!(!loaded.project.flows.is_empty());
}

// --- the command line ------------------------------------------------------------------------

fn flowgate_check(config: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowgate"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.arg("check");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().expect("flowgate runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn cli_check_passes_on_the_shipped_project() {
    let out = flowgate_check(None, &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.trim(), "0 errors, 0 warnings", "{stdout}");
}

#[test]
fn the_shipped_examples_print_no_warning_when_tested() {
    // `test` (like `serve` and `chat`) prints the project's warnings before it starts.
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .arg("test")
        .output()
        .expect("flowgate runs");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stderr, "", "the shipped examples warn");
}

#[test]
fn cli_check_fails_on_errors_and_names_the_place() {
    let out = flowgate_check(Some(&config_of("unknown_goto")), &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let position = format!("{}:7:11", fixture_file("unknown_goto", "flows/greet.yaml"));
    assert!(stdout.contains(&position), "no `{position}` in:\n{stdout}");
    assert!(stdout.contains("1 error, 0 warnings"), "{stdout}");
}

#[test]
fn cli_check_fails_on_a_broken_campaign() {
    let out = flowgate_check(Some(&config_of("campaign_broken")), &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let position = format!(
        "{}:7:11",
        fixture_file("campaign_broken", "campaigns/spring.yaml")
    );
    assert!(stdout.contains(&position), "no `{position}` in:\n{stdout}");
    assert!(stdout.contains("8 errors, 0 warnings"), "{stdout}");
}

#[test]
fn cli_check_passes_with_only_warnings() {
    let out = flowgate_check(Some(&config_of("unreachable")), &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("is never reached"), "{stdout}");
    assert!(stdout.contains("0 errors, 1 warning"), "{stdout}");
}

const SECRET: &str = "fg-secret-7c1d9e4a-do-not-print";

/// `secret` has a valid cloud_api channel whose `access_token` comes from the environment and
/// a broken flow; `secret_config` has an error on the line after the token, so the config's
/// source is quoted around it: it must show `${FG_TEST_SECRET}`, never the value.
#[test]
fn cli_check_never_prints_a_secret() {
    for case in ["secret", "secret_config"] {
        let out = flowgate_check(Some(&config_of(case)), &[("FG_TEST_SECRET", SECRET)]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{case}: {stdout}{stderr}");
        assert!(stdout.contains("1 error"), "{case}: {stdout}");
        assert!(
            !stdout.contains(SECRET),
            "{case}: secret in stdout:\n{stdout}"
        );
        assert!(
            !stderr.contains(SECRET),
            "{case}: secret in stderr:\n{stderr}"
        );
    }
    let out = flowgate_check(
        Some(&config_of("secret_config")),
        &[("FG_TEST_SECRET", SECRET)],
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("access_token: ${FG_TEST_SECRET}"),
        "{stdout}"
    );
}

// --- what always fails at run time -----------------------------------------------------------

/// `a: {say, next: b}`, `b: {say, next: a}`: one message would send until the turn's cap. The
/// loop is an error at its first step, and names both steps with their places; loops that
/// send nothing, wait for the customer, or leave by an `if:` are not reported.
#[test]
fn a_loop_that_sends_without_waiting() {
    let file = fixture_file("sending_loop", "flows/chatter.yaml");
    let diags = check("sending_loop", 1, 0);
    let d = &diags.items[0];
    assert_eq!(
        d.position(),
        format!("{file}:5:3"),
        "{}",
        diags.render(false)
    );
    assert!(d.message.contains("`a` → `b` → `a`"), "{}", d.message);
    let help = d.help.as_deref().unwrap_or_default();
    assert!(
        help.contains(&format!("`a` at {file}:5:3"))
            && help.contains(&format!("`b` at {file}:8:3")),
        "{help}"
    );
}

/// `goto("fund")` in a script file: the flow has no such step. The error is in the script at
/// the call, says which step uses the script, and suggests the nearest step.
#[test]
fn a_script_goto_to_a_missing_step() {
    let file = fixture_file("script_goto_unknown_step", "scripts/lookup.rhai");
    let diags = check("script_goto_unknown_step", 1, 0);
    let d = &diags.items[0];
    assert_eq!(
        d.position(),
        format!("{file}:4:5"),
        "{}",
        diags.render(false)
    );
    assert!(d.message.contains("no step `fund`"), "{}", d.message);
    assert_eq!(
        d.help.as_deref(),
        Some(
            "did you mean `found`? (the script is used by step `lookup` in tests/fixtures/check/script_goto_unknown_step/flows/lookup.yaml)"
        )
    );
}

/// `import` in an inline script: refused whenever the script runs, so an error at the flow's
/// line and column of the statement.
#[test]
fn an_import_in_a_script() {
    let file = fixture_file("script_import", "flows/check.yaml");
    let diags = check("script_import", 1, 0);
    let d = &diags.items[0];
    assert_eq!(
        d.position(),
        format!("{file}:8:7"),
        "{}",
        diags.render(false)
    );
    assert!(d.message.contains("`import` always fails"), "{}", d.message);
}

#[test]
fn locations_contact_cards_reactions_and_quotes_are_checked() {
    let diags = check("rich_messages", 6, 0);
    let file = fixture_file("rich_messages", "flows/rich.yaml");
    assert_eq!(
        positions(&diags),
        ["6:27", "6:44", "10:9", "13:15", "16:13", "17:12"].map(|at| format!("{file}:{at}")),
        "{}",
        diags.render(false)
    );
}

#[test]
fn split_weights_branches_and_targets_are_checked() {
    let diags = check("split_broken", 6, 0);
    let file = fixture_file("split_broken", "flows/ab.yaml");
    assert_eq!(
        positions(&diags),
        ["7:7", "10:28", "11:17", "11:38", "12:9", "16:7"].map(|at| format!("{file}:{at}")),
        "{}",
        diags.render(false)
    );
}

#[test]
fn form_steps_are_checked() {
    let diags = check("form_broken", 6, 0);
    let file = fixture_file("form_broken", "flows/book.yaml");
    assert_eq!(
        positions(&diags),
        ["7:16", "8:13", "10:13", "11:22", "11:28", "12:11"].map(|at| format!("{file}:{at}")),
        "{}",
        diags.render(false)
    );
}
