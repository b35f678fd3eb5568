//! `{{ … }}` interpolation ([`Text`]): arbitrary templates rendered against arbitrary
//! variables never panic; text without `{{` comes back unchanged; a template made of literal
//! text and known variables renders to the concatenation of the text and the values.

use std::sync::LazyLock;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use rhai::Dynamic;

use flowgate::flow::Text;
use flowgate::script::{Context, Scripting, Vars};

use super::config;

static SCRIPTING: LazyLock<Scripting> = LazyLock::new(Scripting::default);

/// A variable's value: text, a number, a flag, unset, or a map (as `contact.attrs` is).
fn value() -> impl Strategy<Value = Dynamic> {
    let leaf = prop_oneof![
        ".{0,12}".prop_map(Dynamic::from),
        any::<i64>().prop_map(Dynamic::from),
        any::<f64>().prop_map(Dynamic::from),
        any::<bool>().prop_map(Dynamic::from),
        Just(Dynamic::UNIT),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop::collection::btree_map("[a-z_]{1,6}", inner, 0..3).prop_map(|m| {
            let map: rhai::Map = m.into_iter().map(|(k, v)| (k.into(), v)).collect();
            Dynamic::from_map(map)
        })
    })
}

fn vars() -> impl Strategy<Value = Vars> {
    prop::collection::btree_map("[a-z_][a-z0-9_]{0,5}", value(), 0..5)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// Renders `text` with `vars`, the way a `say` is rendered in a turn.
fn render(text: &Text, vars: &Vars) -> Result<String, String> {
    with_context(vars, |ctx| {
        text.render(&SCRIPTING, ctx).map_err(|e| e.to_string())
    })
}

/// The typed value of `text`, the way an `http` body or a `set` reads it.
fn typed(text: &Text, vars: &Vars) -> Result<Dynamic, String> {
    with_context(vars, |ctx| {
        text.value(&SCRIPTING, ctx).map_err(|e| e.to_string())
    })
}

fn with_context<T>(vars: &Vars, f: impl FnOnce(&Context<'_>) -> T) -> T {
    let contact = Dynamic::from_map(
        [("name".into(), Dynamic::from("Ana"))]
            .into_iter()
            .collect(),
    );
    let ctx = Context {
        vars,
        contact: &contact,
        message: &Dynamic::UNIT,
        now: Utc.with_ymd_and_hms(2026, 1, 12, 9, 0, 0).unwrap(),
        timezone: None,
    };
    f(&ctx)
}

/// Template text: literal runs, `{{`, `}}`, variable names, expressions, and noise.
fn template() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        ".{0,6}",
        Just("{{".to_string()),
        Just("}}".to_string()),
        Just("{{{".to_string()),
        "[a-z_]{1,4}(\\.[a-z_]{1,4}){0,2}",
        prop::sample::select(vec![
            " ",
            "contact.name",
            "contact",
            "message.text",
            "1 + 2",
            "x.len()",
            "\"a\" + 1",
            "true",
            "false",
            "()",
            "[1, 2]",
            "#{a: 1}",
            "if x { 1 } else { 2 }",
            "x ?? 0",
            "loop { }",
            "0..",
            "`",
            "'",
            "\u{0}",
            "é",
            "😀",
        ])
        .prop_map(str::to_string),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Var(String, String),
}

/// Literal text (no `{`, so a literal cannot open an interpolation) and variables with text
/// values.
fn parts() -> impl Strategy<Value = Vec<Part>> {
    let part = prop_oneof![
        "[^{]{0,10}".prop_map(Part::Lit),
        ("v_[a-z0-9_]{0,6}", ".{0,10}").prop_map(|(n, v)| Part::Var(n, v)),
    ];
    prop::collection::vec(part, 0..8)
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn arbitrary_templates_never_panic(raw in template(), vars in vars()) {
        if let Ok(text) = Text::compile(&raw, &SCRIPTING) {
            let rendered = render(&text, &vars);
            let typed = typed(&text, &vars);
            // Both read the same parts: one fails exactly when the other does.
            prop_assert_eq!(rendered.is_ok(), typed.is_ok(), "{:?} vs {:?}", rendered, typed);
            prop_assert!(text.literal_len() <= raw.chars().count());
        }
    }

    #[test]
    fn text_without_braces_is_unchanged(raw in ".{0,40}", vars in vars()) {
        prop_assume!(!raw.contains("{{"));
        let text = Text::compile(&raw, &SCRIPTING).expect("text without `{{` compiles");
        prop_assert!(text.is_literal());
        prop_assert_eq!(render(&text, &vars).unwrap(), raw);
    }

    #[test]
    fn literals_and_variables_render_to_their_concatenation(parts in parts(), spaced in any::<bool>()) {
        let mut raw = String::new();
        let mut expected = String::new();
        let mut vars = Vars::new();
        for part in &parts {
            match part {
                Part::Lit(s) => {
                    raw.push_str(s);
                    expected.push_str(s);
                }
                Part::Var(name, value) => {
                    raw.push_str(&if spaced { format!("{{{{ {name} }}}}") } else { format!("{{{{{name}}}}}") });
                    let value = vars.entry(name.as_str().into()).or_insert_with(|| Dynamic::from(value.clone()));
                    expected.push_str(&value.clone().into_string().unwrap());
                }
            }
        }
        let text = Text::compile(&raw, &SCRIPTING).unwrap_or_else(|(at, e)| panic!("`{raw}` at {at}: {e}"));
        prop_assert_eq!(render(&text, &vars).unwrap(), expected);
    }
}
