//! `flowgate check` with an error still tells the truth, through the real binary: the
//! misspelled key comes first with the nearest key, the flow with it is still linted (its
//! window warning shown and counted), a reference to a flow that did not load points at
//! that flow's error and comes after it, and "did you mean" works at every level.

use std::path::{Path, PathBuf};

use crate::support;

/// A project in `dir`: `flowgate.yaml` with `config`, and each `(path, text)` file.
fn project(dir: &Path, config: &str, files: &[(&str, &str)]) -> PathBuf {
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("a file in a directory")).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let config_path = dir.join("flowgate.yaml");
    std::fs::write(&config_path, config).unwrap();
    config_path
}

/// `flowgate check`'s exit code and stdout.
async fn check(config: &Path) -> (Option<i32>, String) {
    let out = support::run_flowgate(config, &["check"]).await;
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("check prints UTF-8"),
    )
}

/// The lines that open a diagnostic (`×` an error, `⚠` a warning), in the order printed.
fn headlines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(['×', '⚠']))
        .collect()
}

const MENU: &str = r#"flow: menu
triggers:
  - keywords: [menu]
steps:
  welcome:
    say: "Hi!"
    buttons:
      - { id: orders, title: "My order" }
    next:
      - button: orders
        flow: orders
"#;

/// `sav:` for `save:` in a flow with a step that runs 26 hours later.
const ORDERS_WITH_A_TYPO: &str = r#"flow: orders
triggers:
  - keywords: [order]
steps:
  ask_order:
    ask: "Your order number?"
    sav: order_id
    next: later
  later:
    wait: 26h
    say: "Did order {{order_id}} arrive?"
"#;

#[tokio::test]
async fn a_misspelled_key_comes_first_and_the_flow_is_still_linted() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(
        dir.path(),
        "flows: flows\n",
        &[
            ("flows/menu.yaml", MENU),
            ("flows/orders.yaml", ORDERS_WITH_A_TYPO),
        ],
    );
    let (code, stdout) = check(&config).await;
    assert_eq!(code, Some(1), "an error fails check:\n{stdout}");
    let heads = headlines(&stdout);
    assert!(
        heads[0].contains("unknown field `sav`"),
        "the misspelled key first:\n{stdout}"
    );
    assert!(
        stdout.contains("help: did you mean `save`?"),
        "the nearest key, not `say`:\n{stdout}"
    );
    assert!(
        !stdout.contains("there is no flow"),
        "`orders` is read past its typo, so `menu`'s reference to it stands:\n{stdout}"
    );
    assert!(
        stdout.contains("step `later` runs after `wait: 26h`, when the 24h window is closed"),
        "the window warning of the flow with the typo:\n{stdout}"
    );
    assert_eq!(heads.len(), 2, "{stdout}");
    assert!(stdout.ends_with("1 error, 1 warning\n"), "{stdout}");
}

/// A step with an error (a `goto` to a step that does not exist) does not hide the rest of
/// its flow from the window lint.
#[tokio::test]
async fn a_flow_with_a_broken_step_is_still_linted() {
    let dir = tempfile::tempdir().unwrap();
    let orders = ORDERS_WITH_A_TYPO.replace(
        "    sav: order_id\n    next: later\n",
        "    save: order_id\n    next: later\n  broken:\n    say: \"?\"\n    goto: nowhere\n",
    );
    let config = project(
        dir.path(),
        "flows: flows\n",
        &[("flows/menu.yaml", MENU), ("flows/orders.yaml", &orders)],
    );
    let (code, stdout) = check(&config).await;
    assert_eq!(code, Some(1), "{stdout}");
    let heads = headlines(&stdout);
    assert!(
        heads[0].contains("there is no step `nowhere` in this flow"),
        "{stdout}"
    );
    assert!(
        stdout.contains("step `later` runs after `wait: 26h`"),
        "the window warning of the flow with the broken step:\n{stdout}"
    );
    assert!(!stdout.contains("there is no flow"), "{stdout}");
    assert!(stdout.ends_with("1 error, 1 warning\n"), "{stdout}");
}

#[tokio::test]
async fn a_flow_that_did_not_load_is_named_after_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let orders = ORDERS_WITH_A_TYPO.replace(
        "    sav: order_id\n",
        "    save: order_id\n    attempts: three\n",
    );
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let campaign = std::fs::read_to_string(root_dir.join("examples/campaigns/spring_sale.yaml"))
        .unwrap()
        .replace("on_reply: main_menu", "on_reply: orders");
    let config = project(
        dir.path(),
        &format!(
            "flows: flows\nfallback: orders\ntemplates: {}\n",
            root_dir.join("templates.yaml").display()
        ),
        &[
            ("flows/menu.yaml", MENU),
            ("flows/orders.yaml", &orders),
            ("campaigns/spring.yaml", &campaign),
        ],
    );
    let (code, stdout) = check(&config).await;
    assert_eq!(code, Some(1), "{stdout}");
    let heads = headlines(&stdout);
    assert_eq!(
        heads.len(),
        3,
        "the root error, the reference, the fallback:\n{stdout}"
    );
    let root = format!("{}:8:15", dir.path().join("flows/orders.yaml").display());
    assert!(
        !heads[0].contains("did not load")
            && stdout.find(&format!("[{root}]")) < stdout.find("did not load"),
        "the root error (`attempts: three`) first:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "flow `orders` did not load (see its error in {root})"
        )),
        "the reference points at the root error:\n{stdout}"
    );
    assert!(
        heads[1..].iter().all(|h| h.contains("did not load")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("there is no flow"),
        "neither the menu nor the campaign's `on_reply` is an error of its own:\n{stdout}"
    );
    assert!(!stdout.contains("does not exist"), "{stdout}");
}

/// Every unknown key of a flow file is reported, each with the nearest key, at every level:
/// the flow's top level, a step, a button, a wait, a handoff, an `expect`. (Reading stops at
/// an error the blanked key may have caused: `expect: {}` after `regx` is left out, so the
/// typo in `expect` is last here.)
#[tokio::test]
async fn every_unknown_key_of_a_flow_is_reported_with_the_nearest_key() {
    let dir = tempfile::tempdir().unwrap();
    let flow = r#"flow: typos
trigers:
  - keywords: [typo]
steps:
  one:
    say: "Pick"
    buttons:
      - { id: x, titel: "X" }
    next: two
  two:
    wait: { untl: "09:00" }
    say: "Later"
    next: three
  three:
    handoff: { queue: support, timout: 2h }
    next: four
  four:
    ask: "Why?"
    expect: { regx: 'a' }
"#;
    let config = project(dir.path(), "flows: flows\n", &[("flows/typos.yaml", flow)]);
    let (code, stdout) = check(&config).await;
    assert_eq!(code, Some(1), "{stdout}");
    for (key, nearest) in [
        ("trigers", "triggers"),
        ("titel", "title"),
        ("regx", "regex"),
        ("untl", "until"),
        ("timout", "timeout"),
    ] {
        assert!(
            stdout.contains(&format!("unknown field `{key}`")),
            "`{key}` is reported:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!("did you mean `{nearest}`?")),
            "`{key}` suggests `{nearest}`:\n{stdout}"
        );
    }
    // Read as `until`, the wait is linted: `two` and, after it, `four`'s question.
    assert!(
        stdout.contains("step `four` runs after `wait: { until: \"09:00\" }` in step `two`"),
        "{stdout}"
    );
    assert!(stdout.ends_with("5 errors, 2 warnings\n"), "{stdout}");
}

#[tokio::test]
async fn config_and_campaign_keys_get_the_nearest_key() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (config, nearest) in [
        ("polcy:\n  window: 24h\n", "policy"),
        ("policy:\n  windw: 24h\n", "window"),
        ("outbox:\n  leese: 30s\n", "lease"),
        (
            "channels:\n  - name: a\n    provider: sandbox\n    throughput: 5\n",
            "throughput_mps",
        ),
    ] {
        let path = project(dir.path(), config, &[]);
        let (code, stdout) = check(&path).await;
        assert_eq!(code, Some(1), "{stdout}");
        assert!(
            stdout.contains(&format!("did you mean `{nearest}`?")),
            "{config:?} suggests `{nearest}`:\n{stdout}"
        );
    }
    let campaign = std::fs::read_to_string(root.join("examples/campaigns/spring_sale.yaml"))
        .unwrap()
        .replace("\nschedule:", "\nschedul:");
    let config = format!(
        "flows: {}\nscripts: {}\ntemplates: {}\ncampaigns: campaigns\n",
        root.join("flows").display(),
        root.join("scripts").display(),
        root.join("templates.yaml").display()
    );
    let path = project(dir.path(), &config, &[("campaigns/spring.yaml", &campaign)]);
    let (code, stdout) = check(&path).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("unknown field `schedul`") && stdout.contains("did you mean `schedule`?"),
        "{stdout}"
    );
}
