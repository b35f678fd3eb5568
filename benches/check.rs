//! `check` of 1,000 generated flows: compiling them from memory through `load_sources` (the
//! compile path of `check`, minus reading files), and the whole `load_project` from a
//! temporary directory (listing, reading, templates, compiling, cross-flow checks).
//!
//! Run with `cargo bench --bench check`. Target: under 1 s for 1,000 flows.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use flowgate::config::{Config, PolicyConfig};
use flowgate::flow::lint::Window;
use flowgate::flow::load::{load_project, load_sources};
use flowgate::script::Scripting;
use flowgate::templates::Registry;

const FLOWS: usize = 1_000;

/// One generated flow: a keyword trigger unique to the flow, six steps with button and `if:`
/// branches, an `ask` with `expect: number`, `set`, and `{{ }}` paths and expressions.
const FLOW: &str = r#"flow: product_NUM
description: Questions and orders for product NUM
triggers:
  - keywords: [product NUM, item NUM]
start: welcome
steps:
  welcome:
    say: "Hi {{ contact.name }}! This is product NUM. What would you like to do?"
    buttons:
      - { id: buy, title: "Buy it" }
      - { id: question, title: "Ask a question" }
    next:
      - button: buy
        goto: ask_qty
      - button: question
        goto: question
  ask_qty:
    ask: "How many of product NUM would you like, {{ contact.name }}?"
    save: qty
    expect: number
    retry: "Please write a number, like 3."
    attempts: 3
    on_fail: bye
    next:
      - if: 'qty > 10'
        goto: bulk
      - if: 'qty < 1'
        goto: ask_qty
      - goto: confirm
  bulk:
    set: { discount: "{{ if qty > 50 { 15 } else { 5 } }}" }
    say: "{{qty}} items of product NUM: you get {{discount}}% off."
    next: confirm
  confirm:
    say: "Noted: {{qty}} × product NUM for {{ contact.name }}, {{ qty * PRICE }} € in all."
    tag: buyer_NUM
    end: true
  question:
    ask: "What's your question about product NUM?"
    save: question
    next: bye
  bye:
    say: "Thanks {{ contact.name }}! We'll get back to you about \"{{question}}\"."
"#;

fn sources() -> Vec<(String, String)> {
    (0..FLOWS)
        .map(|i| {
            let text = FLOW
                .replace("PRICE", &(10 + i % 90).to_string())
                .replace("NUM", &i.to_string());
            (format!("flows/product_{i:04}.yaml"), text)
        })
        .collect()
}

fn no_scripts(name: &str) -> Result<(String, String), String> {
    Err(format!("no script `{name}`"))
}

fn check_benches(c: &mut Criterion) {
    let scripting = Scripting::default();
    let sources = sources();

    // Checked once before timing: every flow compiles without errors.
    let window = Window::from_policy(&PolicyConfig::default());
    let project = load_sources(
        &sources,
        &scripting,
        Registry::default(),
        &no_scripts,
        None,
        window.clone(),
    );
    assert!(
        !project.diagnostics.has_errors(),
        "{}",
        project.diagnostics.render(false)
    );
    assert_eq!(project.flows.len(), FLOWS);
    assert_eq!(project.flows[0].steps.len(), 6);

    // The same files on disk, with a templates file and an empty scripts directory.
    let dir = tempfile::tempdir().expect("temp dir");
    let flows_dir = dir.path().join("flows");
    let scripts_dir = dir.path().join("scripts");
    std::fs::create_dir_all(&flows_dir).unwrap();
    std::fs::create_dir_all(&scripts_dir).unwrap();
    for (file, text) in &sources {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let templates = dir.path().join("templates.yaml");
    std::fs::write(
        &templates,
        "templates:\n  - name: order_shipped\n    language: en_US\n    category: utility\n    \
         status: approved\n    body: \"Your order {{1}} shipped on {{2}}.\"\n",
    )
    .unwrap();
    let config = Config {
        flows: flows_dir,
        scripts: scripts_dir,
        templates,
        ..Config::default()
    };
    let project = load_project(&config, &scripting);
    assert!(
        !project.diagnostics.has_errors(),
        "{}",
        project.diagnostics.render(false)
    );
    assert_eq!(project.flows.len(), FLOWS);
    assert_eq!(project.templates.templates.len(), 1);

    let mut group = c.benchmark_group("check_1000_flows");
    // About a second per iteration: ten samples of one iteration each.
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(15));
    group.bench_function("load_sources", |b| {
        b.iter(|| {
            load_sources(
                black_box(&sources),
                &scripting,
                Registry::default(),
                &no_scripts,
                None,
                window.clone(),
            )
        })
    });
    group.bench_function("load_project_from_disk", |b| {
        b.iter(|| load_project(black_box(&config), &scripting))
    });
    group.finish();
}

criterion_group!(benches, check_benches);
criterion_main!(benches);
